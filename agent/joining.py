"""The signed join request: a peer started with `--join` posts its encoded Join command to a
member's `POST /cluster/join`, signed with the cluster secret (HMAC-SHA256), so that only a
holder of the secret can add a voter."""

from __future__ import annotations

import hashlib
import hmac

JOIN_SIGNATURE_HEADER = "X-Redge-Join-Signature"


def sign_join(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
