"""Finding a model to serve by name: the bundled agora-tiny or a local directory (CIDs: node.models)."""

from __future__ import annotations

from pathlib import Path

from agoranet.core.errors import ModelError

BUNDLED = {"agora-tiny": Path(__file__).resolve().parent.parent / "models" / "agora-tiny"}


def resolve_model(spec: str) -> tuple[Path, str]:
    """Return (directory, served name) for a bundled model name or a local model directory."""
    if spec in BUNDLED:
        return BUNDLED[spec], spec
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # llama.cpp's single-file models
        return path.resolve(), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but holds no config.json", hint="point --model at a model directory")
        return path.resolve(), path.name
    raise ModelError(
        f"no model {spec!r}: not a bundled model ({', '.join(BUNDLED)}) and not a directory",
        hint="pass --model agora-tiny, the path of a local transformers model directory, or a .gguf file",
    )



def model_cid(model_dir: Path) -> str:
    """The model's name everywhere in Agora: the UnixFS CID of its directory, as IPFS computes it."""
    from agoranet.store.unixfs import model_cid as unixfs_cid

    return str(unixfs_cid(model_dir))
