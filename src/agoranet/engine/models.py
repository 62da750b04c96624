"""Finding a model to serve: the bundled agora-tiny, a local directory, or (later) a CID."""

from __future__ import annotations

from pathlib import Path

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.errors import ModelError
from agoranet.core.records import encode_canonical

BUNDLED = {"agora-tiny": Path(__file__).resolve().parent.parent / "models" / "agora-tiny"}


def resolve_model(spec: str) -> tuple[Path, str]:
    """Return (directory, served name) for a bundled model name or a local model directory."""
    if spec in BUNDLED:
        return BUNDLED[spec], spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but holds no config.json", hint="point --model at a model directory")
        return path.resolve(), path.name
    raise ModelError(
        f"no model {spec!r}: not a bundled model ({', '.join(BUNDLED)}) and not a directory",
        hint="pass --model agora-tiny or the path of a local transformers model directory",
    )


def model_cid(model_dir: Path) -> str:
    """CID naming a model directory: a DAG-CBOR map of file name -> raw CID of its bytes."""
    files = {p.name: str(cid_of(p.read_bytes())) for p in sorted(model_dir.iterdir()) if p.is_file()}
    return str(cid_of(encode_canonical(files), DAG_CBOR))
