"""Regenerate the committed ``*_pb2*.py`` modules from the ``.proto`` files beside this.

Run ``python -m villi.relay.proto.generate`` (needs grpcio-tools) after editing a
.proto. The generated modules are committed so that running villi needs only grpcio
and protobuf, not the compiler.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    src = here.parents[2]
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(src)) for p in sorted(here.glob("*.proto"))]
    return protoc.main(["protoc", f"-I{src}", f"-I{include}", f"--python_out={src}",
                        f"--pyi_out={src}", f"--grpc_python_out={src}", *files])


if __name__ == "__main__":
    sys.exit(main())
