"""The Edge key: found, adopted, stored and handed over between cluster members.

Lookup order (Go: edge/key.go RetrieveEdgeKey, cmd/agent/main.go): EDGE_KEY; DATA_PATH/agent_edge_key; a
cluster member tagged EdgeKeySet (``GET http://<member>:<port>/key``, unsigned, 3 s, as Go's
client.APIClient). A key set any way is written to the key file (atomically, 0600) and tags this node
``EdgeKeySet=set``; one set through the page or ``POST /key`` is offered to the members without one
(``POST /key``, as Go's PropagateKeyInCluster).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from agent.cluster.membership import Member
from agent.errors import Code, log_failure
from agent.netaddr import host_port
from edge.key import EdgeKey, EdgeKeyError, KeyAlreadySetError, parse_edge_key, read_key_file, write_key_file

if TYPE_CHECKING:
    from agent.state import AgentState

log = logging.getLogger(__name__)

KEY_FILE = "agent_edge_key"
TAG_EDGE_KEY_SET = "EdgeKeySet"
PEER_KEY_TIMEOUT = 3.0


class KeyStore:
    """This node's Edge key (None until one is set) and where it came from."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        self.key: EdgeKey | None = None
        self.text = ""
        self.source = ""
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self.state.config.data_path / KEY_FILE

    async def lookup(self) -> None:
        """EDGE_KEY, the key file, then the cluster; EdgeKeyError for a malformed EDGE_KEY or key file."""
        text, source = self.state.config.edge_key.strip(), "EDGE_KEY"
        if text:
            key = parse_edge_key(text)
        else:
            try:
                text = read_key_file(self.path) or ""
            except OSError as exc:
                log_failure(Code.EDGE_KEY_STORE_FAILED, f"cannot read {self.path}: {exc}")
                text = ""
            source = str(self.path)
            if text:
                try:
                    key = parse_edge_key(text)
                except EdgeKeyError as exc:
                    raise EdgeKeyError(f"{exc} (in {self.path}: fix or remove the file)") from None
            else:
                text, source = await self.from_cluster()
                if not text:
                    return
                try:
                    key = parse_edge_key(text)
                except EdgeKeyError as exc:
                    log_failure(Code.EDGE_KEY_INVALID, f"the key handed over by {source} is unusable: {exc}")
                    return
        await self._adopt(key, text, source, persist=source != str(self.path))

    async def take(self, text: str, source: str) -> None:
        """A key set later (page, ``POST /key``, cluster); EdgeKeyError or KeyAlreadySetError."""
        async with self._lock:
            if self.key is not None:
                raise KeyAlreadySetError("An Edge key is already associated to this agent")
            await self._adopt(parse_edge_key(text), text, source, persist=True)

    async def _adopt(self, key: EdgeKey, text: str, source: str, persist: bool) -> None:
        self.key, self.text, self.source = key, text.strip(), source
        log.info("Edge key loaded from %s (Portainer %s, tunnel %s, endpoint %s)", source, key.portainer_url,
                 key.tunnel_addr, key.endpoint_id or "global")
        if not key.portainer_url.startswith("https://"):
            log.warning("the Edge key's Portainer URL is not https: polls and job logs travel unencrypted")
        if persist:
            try:
                await asyncio.to_thread(write_key_file, self.path, self.text)
            except OSError as exc:
                log_failure(Code.EDGE_KEY_STORE_FAILED, f"the Edge key is used but cannot be stored in "
                            f"{self.path}: {exc}")
        await self.state.membership.set_tags({TAG_EDGE_KEY_SET: "set"})

    def peers(self) -> list[Member]:
        me = self.state.info.node_name
        return [m for m in self.state.members() if m.node_name != me]

    async def from_cluster(self) -> tuple[str, str]:
        """(key text, source) from the first member tagged EdgeKeySet that hands it over, else ("", "")."""
        for member in self.peers():
            if not member.edge_key_set:
                continue
            url = f"http://{host_port(member.ip, member.agent_port)}/key"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_KEY_TIMEOUT)) as http, \
                        http.get(url) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise ValueError(f"HTTP {resp.status}")
                data = json.loads(body)
                text = data.get("key") if isinstance(data, dict) else None
                if isinstance(text, str) and text:
                    return text, f"cluster member {member.node_name}"
                raise ValueError("no key in the answer")
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log_failure(Code.EDGE_KEY_HANDOVER_FAILED, f"cannot get the Edge key from member {member.node_name}: "
                            f"{exc or type(exc).__name__}", url=url)
        return "", ""

    async def propagate(self) -> None:
        """Offer the key to members without one (Go: PropagateKeyInCluster), one attempt each."""
        for member in self.peers():
            if member.edge_key_set:
                continue
            url = f"http://{host_port(member.ip, member.agent_port)}/key"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_KEY_TIMEOUT)) as http, \
                        http.post(url, json={"Key": self.text}) as resp:
                    if resp.status not in (204, 409):
                        raise ValueError(f"HTTP {resp.status}")
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log_failure(Code.EDGE_KEY_HANDOVER_FAILED, f"cannot hand the Edge key to member {member.node_name}: "
                            f"{exc or type(exc).__name__}", url=url)
