"""ctypes bindings to the parts of libbpf 1.1 (``libbpf.so.1``) that villi uses.

Only declarations live here: argument/return types and the option structs, plus a
print callback that captures libbpf's messages so errors can quote them. The typed,
Pythonic layer on top is in ``loader``, ``maps``, ``tc`` and ``testrun``.

libbpf 1.x reports failures as ``-errno`` for int-returning calls and as NULL with
``errno`` set for pointer-returning ones; ``check``/``check_ptr`` turn both into
``DatapathError`` subclasses with the errno attached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import threading
from collections import deque

from villi.errors import DatapathError

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

c_int, c_uint, c_void_p, c_char_p, c_size_t = (
    ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)
c_u32, c_u64, c_bool = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_bool


class BpfObjectOpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_u32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_u32),
    ]


class BpfTcHook(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int),
                ("parent", c_u32)]


class BpfTcOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_u32), ("prog_id", c_u32),
                ("handle", c_u32), ("priority", c_u32)]


class BpfTestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
        ("data_size_in", c_u32), ("data_size_out", c_u32),
        ("ctx_in", c_void_p), ("ctx_out", c_void_p),
        ("ctx_size_in", c_u32), ("ctx_size_out", c_u32),
        ("retval", c_u32), ("repeat", c_int), ("duration", c_u32), ("flags", c_u32),
        ("cpu", c_u32), ("batch_size", c_u32),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_u64), ("flags", c_u64)]


BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


def _fn(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


bpf_object__open_file = _fn("bpf_object__open_file", c_void_p, c_char_p,
                            ctypes.POINTER(BpfObjectOpenOpts))
bpf_object__load = _fn("bpf_object__load", c_int, c_void_p)
bpf_object__close = _fn("bpf_object__close", None, c_void_p)
bpf_object__find_program_by_name = _fn("bpf_object__find_program_by_name", c_void_p,
                                       c_void_p, c_char_p)
bpf_object__find_map_by_name = _fn("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
bpf_object__next_program = _fn("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
bpf_object__next_map = _fn("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
bpf_program__fd = _fn("bpf_program__fd", c_int, c_void_p)
bpf_program__name = _fn("bpf_program__name", c_char_p, c_void_p)
bpf_program__set_log_buf = _fn("bpf_program__set_log_buf", c_int, c_void_p, c_void_p, c_size_t)
bpf_program__set_log_level = _fn("bpf_program__set_log_level", c_int, c_void_p, c_u32)
bpf_map__fd = _fn("bpf_map__fd", c_int, c_void_p)
bpf_map__name = _fn("bpf_map__name", c_char_p, c_void_p)

bpf_map_update_elem = _fn("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_u64)
bpf_map_lookup_elem = _fn("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
bpf_map_delete_elem = _fn("bpf_map_delete_elem", c_int, c_int, c_void_p)
bpf_map_get_next_key = _fn("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
bpf_map_lookup_batch = _fn("bpf_map_lookup_batch", c_int, c_int, c_void_p, c_void_p, c_void_p,
                           c_void_p, ctypes.POINTER(c_u32), ctypes.POINTER(BpfMapBatchOpts))
bpf_map_update_batch = _fn("bpf_map_update_batch", c_int, c_int, c_void_p, c_void_p,
                           ctypes.POINTER(c_u32), ctypes.POINTER(BpfMapBatchOpts))
bpf_map_delete_batch = _fn("bpf_map_delete_batch", c_int, c_int, c_void_p,
                           ctypes.POINTER(c_u32), ctypes.POINTER(BpfMapBatchOpts))
bpf_obj_get = _fn("bpf_obj_get", c_int, c_char_p)
bpf_obj_pin = _fn("bpf_obj_pin", c_int, c_int, c_char_p)
bpf_obj_get_info_by_fd = _fn("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p,
                             ctypes.POINTER(c_u32))
bpf_prog_test_run_opts = _fn("bpf_prog_test_run_opts", c_int, c_int,
                             ctypes.POINTER(BpfTestRunOpts))
bpf_prog_attach = _fn("bpf_prog_attach", c_int, c_int, c_int, c_int, c_uint)
bpf_prog_detach2 = _fn("bpf_prog_detach2", c_int, c_int, c_int, c_int)
bpf_tc_hook_create = _fn("bpf_tc_hook_create", c_int, ctypes.POINTER(BpfTcHook))
bpf_tc_hook_destroy = _fn("bpf_tc_hook_destroy", c_int, ctypes.POINTER(BpfTcHook))
bpf_tc_attach = _fn("bpf_tc_attach", c_int, ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts))
bpf_tc_detach = _fn("bpf_tc_detach", c_int, ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts))
bpf_tc_query = _fn("bpf_tc_query", c_int, ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts))
libbpf_num_possible_cpus = _fn("libbpf_num_possible_cpus", c_int)

# --- libbpf's log: captured, so errors can quote what libbpf said -------------------
_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = c_int
_vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_log_lock = threading.Lock()
_log: deque[str] = deque(maxlen=400)


def _on_print(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(4096)
    _vsnprintf(buf, len(buf), fmt, args)
    with _log_lock:
        _log.append(buf.value.decode(errors="replace"))
    return 0


_print_cb = _PRINT_FN(_on_print)  # keep a reference: libbpf holds the pointer
_lib.libbpf_set_print.restype = c_void_p
_lib.libbpf_set_print.argtypes = [_PRINT_FN]
_lib.libbpf_set_print(_print_cb)


def take_log() -> str:
    """libbpf's messages since the last call (and forget them)."""
    with _log_lock:
        text = "".join(_log)
        _log.clear()
    return text


def check(ret: int, what: str, exc: type[DatapathError] = DatapathError) -> int:
    """Raise ``exc`` for a negative libbpf return; return ``ret`` otherwise."""
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise exc(f"{what}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})", errno=err)
    return ret


def check_ptr(ptr: int | None, what: str, exc: type[DatapathError] = DatapathError) -> int:
    """Raise ``exc`` for a NULL pointer from libbpf; return the pointer otherwise."""
    if not ptr:
        err = ctypes.get_errno() or _errno.EINVAL
        detail = take_log().strip()
        msg = f"{what}: {os.strerror(err)}"
        if detail:
            msg += f"\n{detail}"
        raise exc(msg, errno=err)
    return ptr


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    return check(libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
