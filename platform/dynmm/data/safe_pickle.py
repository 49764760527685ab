"""Loading a pickle a user brings without letting it run code.

``pickle.load`` calls whatever callable the file names (``posix.system``, ``builtins.eval``, ...), so a
crafted dataset file runs its payload before any key is checked. The MultiBench files are pickles of
dicts, lists, strings and numpy arrays: ``load_data_pickle`` resolves only the names those need and
refuses any other with a DatasetError naming the file and the refused name, before it is imported or
called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from dynmm.errors import DatasetError

_CONTAINERS_AND_SCALARS = {
    "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex", "bool",
}
# (module, name) pairs a pickle of plain containers and numpy arrays refers to, under numpy 1 and 2 and
# pickle protocols 2 to 5 (``__builtin__`` and ``_codecs.encode`` come from protocol 2).
ALLOWED_GLOBALS = frozenset(
    {(module, name) for module in ("builtins", "__builtin__") for name in _CONTAINERS_AND_SCALARS}
    | {("_codecs", "encode"), ("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype")}
    | {
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    }
)


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source_name: str):
        super().__init__(file)
        self.source_name = source_name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DatasetError(
                f"{self.source_name}: refused to unpickle {module}.{name}; a data pickle may hold only dicts, "
                "lists, strings, numbers and numpy arrays (this file would run code when loaded)"
            )
        return super().find_class(module, name)


def load_data_pickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only containers, scalars and numpy arrays; any failure is a DatasetError."""
    try:
        with open(path, "rb") as file:
            return _DataOnlyUnpickler(file, path.name).load()
    except DatasetError:
        raise
    except Exception as error:  # unpickling fails in many ways; each means "not the expected pickle"
        raise DatasetError(f"{path.name}: not a readable pickle ({type(error).__name__}: {error})") from None
