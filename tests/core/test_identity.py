import os
import stat

import pytest

from agoranet.core.errors import CorruptKeyFile, IdentityExists, IdentityMissing, InvalidPeerId
from agoranet.core.identity import Identity, PeerId


def test_peer_id_follows_libp2p_and_did_key_conventions():
    ident = Identity.generate()
    text = str(ident.peer_id)
    assert text.startswith("12D3KooW")  # identity-multihash of an Ed25519 protobuf key
    assert ident.peer_id.did.startswith("did:key:z6Mk")
    assert PeerId.parse(text) == ident.peer_id
    assert PeerId.parse(ident.peer_id.did) == ident.peer_id


def test_signature_checks():
    ident, other = Identity.generate(), Identity.generate()
    sig = ident.sign(b"msg")
    assert ident.peer_id.verify(sig, b"msg")
    assert not ident.peer_id.verify(sig, b"msh")
    assert not other.peer_id.verify(sig, b"msg")


def test_key_file_is_private_and_reloads(tmp_path):
    path = tmp_path / "home" / "identity.key"
    ident = Identity.generate()
    ident.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load(path).peer_id == ident.peer_id
    assert "PRIVATE" not in repr(ident)


def test_existing_identity_is_not_overwritten_without_force(tmp_path):
    path = tmp_path / "identity.key"
    first = Identity.generate()
    first.save(path)
    with pytest.raises(IdentityExists, match="--force"):
        Identity.generate().save(path)
    assert Identity.load(path).peer_id == first.peer_id
    Identity.generate().save(path, force=True)
    assert Identity.load(path).peer_id != first.peer_id


def test_corrupt_and_missing_key_files_explain_themselves(tmp_path):
    path = tmp_path / "identity.key"
    with pytest.raises(IdentityMissing, match="agora init"):
        Identity.load(path)
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CorruptKeyFile, match="not a readable Ed25519"):
        Identity.load(path)


@pytest.mark.parametrize("bad", ["", "12D3KooWnot-base58!", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"])
def test_bad_peer_ids_are_rejected(bad):
    with pytest.raises(InvalidPeerId):
        PeerId.parse(bad)
