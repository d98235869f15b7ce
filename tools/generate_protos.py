"""Regenerate the code of app_kit's own protos (health, reflection) and of the examples.

app_kit's own messages live in a private descriptor pool (``app_kit.protos.POOL``): the
standard services' symbols (``grpc.health.v1.*``) are also registered by grpcio's packages,
and one process may load both. Run from the repository root: ``python tools/generate_protos.py``.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
OWN = ["grpc/health/v1/health.proto", "grpc/reflection/v1/reflection.proto", "grpc/reflection/v1alpha/reflection.proto"]
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_app_kit_pool.POOL.AddSerializedFile("


def protoc(include: pathlib.Path, out: pathlib.Path, files: list[str], options: str = "") -> None:
    """Run grpc_tools' protoc with protobuf's Python generator and ours."""
    with tempfile.TemporaryDirectory() as tmp:
        plugin = pathlib.Path(tmp) / "protoc-gen-app_kit"
        plugin.write_text(f"#!{sys.executable}\nfrom app_kit.plugin.main import main\nmain()\n")
        plugin.chmod(0o755)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--plugin=protoc-gen-app_kit={plugin}",
                f"--app_kit_out={options}{out}",
                *files,
            ],
            check=True,
            cwd=include,
        )


def generate(root: pathlib.Path = ROOT, out_root: pathlib.Path | None = None) -> None:
    """Write the generated files under ``out_root`` (default: in place)."""
    out_root = out_root or root
    own_out = out_root / "app_kit/protos"
    own_out.mkdir(parents=True, exist_ok=True)
    protoc(root / "app_kit/protos", own_out, OWN, "import_prefix=app_kit.protos.:")
    for name in OWN:
        module = own_out / name.replace(".proto", "_pb2.py")
        text = module.read_text()
        assert _DEFAULT_POOL in text, module
        pool_import = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
        text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL).replace(
            pool_import, pool_import + "from app_kit import protos as _app_kit_pool\n"
        )
        module.write_text(text)
    (out_root / "examples/cafe").mkdir(parents=True, exist_ok=True)
    protoc(root, out_root, ["examples/cafe/cafe.proto"])
    (out_root / "examples/interop").mkdir(parents=True, exist_ok=True)
    protoc(root, out_root, [f"examples/interop/{name}.proto" for name in ("empty", "messages", "testing")])
    for example in ("chat", "notes", "fanout"):
        (out_root / "examples" / example).mkdir(parents=True, exist_ok=True)
        protoc(root, out_root, [f"examples/{example}/{example}.proto"])


if __name__ == "__main__":
    generate()
