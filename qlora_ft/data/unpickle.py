"""Restricted unpickling: pickled datasets (the original format, a list of `{"sentence": ...}`) without running
the code a pickle can name.

Hand-written because no library restricts pickle: `pickle.load` runs any callable a file names. This
unpickler resolves only the globals a list/dict of strings or a pandas DataFrame/Series of text needs
(current and older pandas/numpy names); everything else is refused before anything is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from qlora_ft.errors import UserError

#
_SAFE_GLOBALS = {
    ("builtins", "slice"), ("builtins", "bytearray"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "complex"), ("__builtin__", "slice"), ("__builtin__", "bytearray"), ("__builtin__", "set"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes
    ("collections", "OrderedDict"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("pandas", "DataFrame"), ("pandas", "Series"), ("pandas", "Index"), ("pandas", "RangeIndex"),
    ("pandas", "NA"), ("pandas", "StringDtype"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.internals.blocks", "new_block"), ("pandas.core.internals.blocks", "ObjectBlock"),
    ("pandas.core.internals.blocks", "Block"), ("pandas.core.internals.blocks", "NumpyBlock"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pandas.arrays", "StringArray"), ("pandas.arrays", "ArrowStringArray"),
    ("pandas.core.arrays.string_", "StringArray"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
    ("pyarrow.lib", "_restore_array"), ("pyarrow.lib", "py_buffer"), ("pyarrow.lib", "type_for_alias"),
}  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(data: bytes, source: str = "pickle") -> Any:
    """Load pickled builtin containers, strings, numbers and pandas text tables without running other code."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise UserError(
                f"{source}: {e}: only lists/dicts of text and pandas DataFrames/Series are accepted "
                "(nothing in the file was executed)"
            ) from None
        raise UserError(f"{source}: not a readable pickle, corrupt or truncated ({e})") from None
    except Exception as e:  # any failure inside a malformed stream: EOFError, ValueError, struct errors, ...
        raise UserError(f"{source}: not a readable pickle, corrupt or truncated ({type(e).__name__}: {e})") from None
