"""A tenant authenticated by a signed token (a JWT from one of tenants.yaml's ``jwt_issuers``) instead of an API key.

The token's issuer names the configured issuer; its signature is checked with that issuer's key (by ``kid``) and
an algorithm the issuer allows (never ``none``, never a shared secret, so a public key cannot be turned into one);
``exp``, ``aud`` and ``iss`` are required, ``nbf`` and ``iat`` enforced when present, with the issuer's leeway. The
tenant is the issuer's fixed one or the token's tenant claim; the end user its user claim. Each failure is a 401
that says which check failed, never the token.

A token checked once is remembered until it expires (at most ``REMEMBERED`` of them): a client sending the same
token on every request pays for one signature check, not one per request.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import jwt

from gateway.config.issuers import JwtIssuer, KeySet
from gateway.config.types import ApiKey, GatewayConfig
from gateway.errors import GatewayError

JWT_USER = "gateway.jwt_user"  # scope key: the end user the token names
REMEMBERED = 10_000


class SigningKeyUnknown(GatewayError):
    """The token names a key its issuer's key set lacks: worth reading the issuer's keys again, once."""

    def __init__(self, key_set: KeySet, issuer: str) -> None:
        super().__init__(401, f"The token is signed with a key the issuer '{issuer}' does not publish.",
                         code="unknown_signing_key")
        self.key_set = key_set


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


def _refused(code: str, message: str) -> GatewayError:
    return GatewayError(401, message, code=code)


class TokenCheck:
    """Checks tokens against a config's issuers; remembers the ones that passed."""

    def __init__(self) -> None:
        self._passed: OrderedDict[bytes, tuple[float, str, str | None, JwtIssuer]] = OrderedDict()

    def check(self, token: str, config: GatewayConfig) -> tuple[str, ApiKey, str | None]:
        """The tenant id, the key the request is accounted to, and the end user; a GatewayError (401) otherwise."""
        digest = hashlib.sha256(token.encode("latin-1")).digest()
        known = self._passed.get(digest)
        now = time.time()
        if known is not None:
            expires, tenant_id, user, issuer = known
            if now < expires and issuer in config.jwt_issuers:
                return tenant_id, _key_of(issuer, tenant_id, expires), user
            del self._passed[digest]
        issuer, claims = _verify(token, config)
        tenant_id = issuer.tenant or claims.get(issuer.tenant_claim)
        if not isinstance(tenant_id, str) or not tenant_id:
            raise _refused("missing_token_claim", f"The token has no tenant claim '{issuer.tenant_claim}'.")
        user = claims.get(issuer.user_claim)
        user = user[:256] if isinstance(user, str) and user else None
        expires = float(claims["exp"]) + issuer.leeway
        self._passed[digest] = (expires, tenant_id, user, issuer)
        if len(self._passed) > REMEMBERED:
            self._passed.popitem(last=False)
        return tenant_id, _key_of(issuer, tenant_id, expires), user


def _key_of(issuer: JwtIssuer, tenant_id: str, expires: float) -> ApiKey:
    return ApiKey(tenant_id, f"jwt:{issuer.name}", expires, access=issuer.access)


def _verify(token: str, config: GatewayConfig) -> tuple[JwtIssuer, dict]:
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _refused("malformed_token", "The bearer token is neither an API key of this gateway nor a well-formed "
                                          "JWT.") from None
    issued_by = unverified.get("iss")
    issuer = next((i for i in config.jwt_issuers if i.issuer == issued_by), None)
    if issuer is None:
        raise _refused("unknown_token_issuer", "The token's issuer (iss) is not one this gateway trusts.")
    algorithm = header.get("alg")
    if algorithm not in issuer.algorithms:
        raise _refused("token_algorithm_not_allowed", f"The token is signed with '{str(algorithm)[:20]}'; issuer "
                                                      f"'{issuer.name}' allows {', '.join(issuer.algorithms)}.")
    key_set = issuer.key_set
    if key_set.stale:
        key_set.refresh_soon()
    kid = header.get("kid")
    key = key_set.find(kid if isinstance(kid, str) else None)
    if key is None:
        raise SigningKeyUnknown(key_set, issuer.name)
    try:
        claims = jwt.decode(token, key=key, algorithms=[algorithm], audience=list(issuer.audience),
                            issuer=issuer.issuer, leeway=issuer.leeway,
                            options={"require": ["exp", "iss", "aud"], "verify_sub": False, "verify_jti": False})
    except jwt.ExpiredSignatureError:
        raise _refused("expired_token", "The token has expired (exp).") from None
    except jwt.ImmatureSignatureError:
        raise _refused("token_not_yet_valid", "The token is not valid yet (nbf or iat in the future).") from None
    except jwt.InvalidAudienceError:
        raise _refused("invalid_token_audience", "The token's audience (aud) is not this gateway.") from None
    except jwt.InvalidSignatureError:
        raise _refused("invalid_token_signature", "The token's signature does not verify.") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _refused("missing_token_claim", f"The token has no '{exc.claim}' claim.") from None
    except jwt.PyJWTError as exc:
        raise _refused("invalid_token", f"The token is not valid ({type(exc).__name__}).") from None
    return issuer, claims
