"""schemathesis hooks for the stateful phase of bench/fuzz_api.sh: the session tokens the
links carry are real credentials.

The operations on a session take its driver's token as a bearer token (the `SessionToken`
scheme). The stateful phase follows the links from `POST /sessions` and puts the token of the
answer in the `Authorization` header. Without this hook schemathesis counts that header as
made up and takes the successful answer for an API that accepts any token; declared as the
run's own authentication, it is known to be real, and the authentication check probes each
operation without it and with a wrong one instead (both must be refused: 401 or 403).
"""

from __future__ import annotations

import schemathesis


@schemathesis.auth()
class TokensFromLinks:
    def get(self, case, ctx):
        return "from the link"  # the links set the header; nothing to fetch

    def set(self, case, data, ctx) -> None:
        pass  # the header the link supplies (or none) is sent as it is
