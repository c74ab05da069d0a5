"""Built-in methods; importing this package registers them (one module per method)."""

from ptqbench.methods import loraq, rtn, smoothquant, svdquant  # noqa: F401
