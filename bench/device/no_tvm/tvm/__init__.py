"""A stand-in for TVM on machines without it (the lent GPU machine's image has none).

abqc imports its codegen at import time; the fake_quant backend and the calibration never
call into it. Put this folder first on PYTHONPATH there: every ``tvm`` / ``tvm.*`` name
resolves to an inert placeholder, and any *use* of one raises, so nothing silently runs
without the real TVM. Never installed with the package.
"""
import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    """Absorbs attribute access, calls and decoration at import time; fails when used."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator: keep the function
        return _Missing(f"{self._name}(...)")

    def __getitem__(self, item):
        return _Missing(f"{self._name}[...]")

    def __mro_entries__(self, bases):
        return (object,)

    def __repr__(self):
        return f"<no TVM here: {self._name}>"


class _Module(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("tvm."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _Module(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Module
__version__ = "0.0-stub"
