"""Ed25519 identities and libp2p-compatible peer ids (`12D3KooW…`), plus their did:key form.

A peer id is the identity multihash of the libp2p protobuf public key, so anyone holding the id
holds the key: records carry only the signer's peer id and still verify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libipld import decode_multibase, encode_multibase

from agoranet.core.errors import CorruptKeyFile, IdentityExists, IdentityMissing, InvalidPeerId

# libp2p crypto.proto: PublicKey { KeyType Type = 1 (Ed25519 = 1); bytes Data = 2 } for 32-byte keys.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_IDENTITY_MULTIHASH = bytes([0x00, 0x24])  # identity hash code, 36-byte digest
_DID_KEY_ED25519 = bytes([0xED, 0x01])  # multicodec ed25519-pub, varint

KEY_FILE = "identity.key"


@dataclass(frozen=True)
class PeerId:
    """A node's public identity; `str()` gives the libp2p base58btc form."""

    public_key: bytes

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse a `12D3KooW…` peer id (or a did:key) back into its Ed25519 public key."""
        try:
            if text.startswith("did:key:"):
                raw = _base58btc(text.removeprefix("did:key:"))
                if raw[:2] != _DID_KEY_ED25519 or len(raw) != 34:
                    raise ValueError("not an ed25519 did:key")
                return cls(raw[2:])
            raw = _base58btc("z" + text)
        except Exception as exc:
            raise InvalidPeerId(f"not an Agora peer id: {text[:60]!r}") from exc
        if raw[:2] != _IDENTITY_MULTIHASH or raw[2:6] != _LIBP2P_ED25519_PREFIX or len(raw) != 38:
            raise InvalidPeerId(f"peer id {text[:60]!r} is not an Ed25519 libp2p peer id")
        return cls(raw[6:])

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerId:
        """The binary multihash form libp2p puts on the wire (what the go-libp2p daemon sends)."""
        if raw[:2] != _IDENTITY_MULTIHASH or raw[2:6] != _LIBP2P_ED25519_PREFIX or len(raw) != 38:
            raise InvalidPeerId(f"{raw[:8].hex()}… is not an Ed25519 libp2p peer id")
        return cls(raw[6:])

    def to_bytes(self) -> bytes:
        return _IDENTITY_MULTIHASH + _LIBP2P_ED25519_PREFIX + self.public_key

    def __str__(self) -> str:
        return encode_multibase("z", self.to_bytes())[1:]

    @property
    def did(self) -> str:
        return "did:key:" + encode_multibase("z", _DID_KEY_ED25519 + self.public_key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def _write_private(path: Path, data: bytes) -> None:
    """Write key material atomically, created with mode 0600 so no other user can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _base58btc(text: str) -> bytes:
    """Decode a multibase base58btc string ("z…"); any other base is refused."""
    if not text.startswith("z"):
        raise ValueError("not base58btc")
    return decode_multibase(text)[1]


class Identity:
    """A node's Ed25519 key pair. The private key never leaves this object except to its 0600 file."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peer_id = PeerId(raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:  # never show key material
        return f"Identity({self.peer_id})"

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: Path, *, force: bool = False) -> None:
        """Write the private key as PKCS#8 PEM, created with mode 0600 so no other user can read it."""
        if path.exists() and not force:
            raise IdentityExists(f"an identity already exists at {path}")
        _write_private(path, self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def save_libp2p_key(self, path: Path) -> None:
        """Write the key in libp2p's protobuf private-key form (mode 0600), for a go-libp2p daemon's `-id`,
        so the daemon's peer id is this node's."""
        raw = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        # crypto.proto PrivateKey { Type = Ed25519 (1); Data = 64 bytes: seed, then public key }
        _write_private(path, bytes([0x08, 0x01, 0x12, 0x40]) + raw + self.peer_id.public_key)

    @classmethod
    def load(cls, path: Path) -> Identity:
        if not path.exists():
            raise IdentityMissing(f"no identity at {path}")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except Exception as exc:
            raise CorruptKeyFile(f"the key file {path} is not a readable Ed25519 private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise CorruptKeyFile(f"the key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        return cls.load(path) if path.exists() else cls._created(path)

    @classmethod
    def _created(cls, path: Path) -> Identity:
        identity = cls.generate()
        identity.save(path)
        return identity
