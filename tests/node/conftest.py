from .storage_peers import storage_peers as storage_peers  # the fixture, for every test in this folder
