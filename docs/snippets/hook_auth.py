"""AUTH for a few users whose salted password hashes are given to the plugin."""

import asyncio

from bonzo import Accept, hookimpl
from bonzo.auth import dummy_hash, verify_password


class StaticUsers:
    def __init__(self, hashes):
        self.hashes = dict(hashes)  # user name -> bonzo.auth.hash_password(password)

    @hookimpl
    async def bonzo_auth(self, username, password):
        stored = self.hashes.get(username)
        # scrypt is slow on purpose: check in a thread, and check an unknown
        # user against a dummy hash so that it takes as long as a known one.
        ok = await asyncio.to_thread(verify_password, password, stored or dummy_hash())
        if ok and stored is not None:
            return Accept()  # session.auth is now username
        return None  # not ours to vouch for: 535 5.7.8 unless another plugin accepts
