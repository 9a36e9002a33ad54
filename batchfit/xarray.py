"""batchfit for xarray: ``batchfit.xarray.fit(da, dim, model=...)``, and ``da.batchfit.fit(dim,
...)`` once this module is imported. Needs the ``xarray`` extra (``pip install
'batchfit[xarray]'``); ``batchfit`` itself never imports it. (``import xarray`` in
``batchfit.pipeline.stacks`` is absolute: it finds the xarray package, not this module.)"""

from batchfit.pipeline.stacks import fit, xr  # (stacks says which extra a missing xarray is in)

__all__ = ["BatchfitAccessor", "fit"]


@xr.register_dataarray_accessor("batchfit")
class BatchfitAccessor:
    """``da.batchfit.fit(dim, model=None, **options)``: ``batchfit.xarray.fit`` on ``da``."""

    def __init__(self, da):
        self._da = da

    def fit(self, dim, model=None, **options):
        return fit(self._da, dim, model, **options)
