"""Generate the bench code for all three implementations into bench/_gen (not committed)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
GEN = HERE / "_gen"


def _plugin(directory: pathlib.Path, name: str, module: str) -> pathlib.Path:
    script = directory / f"protoc-gen-{name}"
    script.write_text(f"#!{sys.executable}\nfrom {module} import main\nmain()\n")
    script.chmod(0o755)
    return script


def generate(with_grpclib: bool = True) -> pathlib.Path:
    """(Re)create bench/_gen with bench_pb2 and one directory of stubs per implementation."""
    if GEN.exists():
        shutil.rmtree(GEN)
    for sub in ("app_kit", "grpclib", "grpcio"):
        (GEN / sub).mkdir(parents=True)
    app_kit_plugin = _plugin(GEN, "app_kit", "app_kit.plugin.main")
    grpclib_plugin = _plugin(GEN, "grpclib_python", "grpclib.plugin.main")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={GEN}",
            f"--plugin=protoc-gen-app_kit={app_kit_plugin}",
            f"--app_kit_out={GEN / 'app_kit'}",
            # grpclib's plugin only when grpclib is installed (the --smoke run needs none).
            *(
                [f"--plugin=protoc-gen-grpclib_python={grpclib_plugin}", f"--grpclib_python_out={GEN / 'grpclib'}"]
                if with_grpclib
                else []
            ),
            f"--grpc_python_out={GEN / 'grpcio'}",
            "bench.proto",
        ],
        check=True,
        cwd=HERE,
    )
    return GEN


if __name__ == "__main__":
    print(generate())
