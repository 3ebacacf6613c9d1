"""Async evaluation client for a ``vllm serve --kv-eviction namm`` server (OpenAI completions API).

Failure policy (why each case is handled the way it is):

* connection refused / reset → retried with exponential backoff; if *every* attempt of a
  request failed to connect, the server is gone: :class:`ServerUnreachableError`, one
  clear error that stops the run (the last generation's checkpoint allows ``--resume``);
* HTTP 5xx, 429 and timeouts → retried; when retries are exhausted the request is a
  *failure*: logged as a warning and returned with ``ok=False`` so the caller counts it
  (never silently scored 0);
* HTTP 400 → :class:`BadSettingError` naming the per-request settings we sent: a bad
  ``vllm_xargs`` value is a bug in the config or a server mismatch, retrying cannot help;
* other 4xx (unknown model, ...) → :class:`ServerRequestError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import openai

from evolve.config import ServerConfig

log = logging.getLogger("evolve")
T = TypeVar("T")


class ServerUnreachableError(RuntimeError):
    """No connection to the server after the bounded retries."""


class BadSettingError(RuntimeError):
    """The server answered 400 to a request's settings (``vllm_xargs``)."""


class ServerRequestError(RuntimeError):
    """A non-retryable HTTP error other than 400 (e.g. 404 unknown model)."""


@dataclass(frozen=True)
class GenerationResult:
    """One completion. ``ok=False``: the request failed after its retries (``error`` says why).

    Log-likelihood requests (:meth:`EvalClient.answer_logprob`) carry the answer's mean
    log-probability per token in ``text``, as a decimal string, so both kinds share one cache.
    """

    text: str | None
    retained_fraction: float = 1.0
    ok: bool = True
    error: str | None = None
    attempts: int = 1
    eviction_steps: int | None = None
    last_eviction_at: int | None = None


def retained_fraction_of(payload: Any) -> float:
    """``kv_transfer_params.namm.retained_fraction``; 1.0 when eviction did not run (field absent/None)."""
    if not isinstance(payload, dict):
        return 1.0
    namm = payload.get("namm")
    if not isinstance(namm, dict) or namm.get("retained_fraction") is None:
        return 1.0
    return float(namm["retained_fraction"])


def server_root(base_url: str) -> str:
    """``http://h:p/v1`` → ``http://h:p`` (``/health``, ``/tokenize`` live at the root)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _describe_xargs(xargs: dict[str, Any]) -> str:
    parts = []
    for k, v in xargs.items():
        if isinstance(v, list):
            parts.append(f"{k}=<{len(v)} values>")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


async def gather_or_cancel(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Like ``asyncio.gather`` but the first exception cancels everything still running and is
    re-raised alone — one clear error instead of hundreds from a whole generation in flight."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class EvalClient:
    """OpenAI ``AsyncOpenAI`` with our own retry policy and a concurrency limit."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.model: str | None = cfg.model
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        # max_retries=0: the SDK's retries would hide failures from our accounting.
        self._oai = openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=cfg.api_key, timeout=cfg.timeout_s, max_retries=0
        )
        self._http = httpx.AsyncClient(base_url=server_root(cfg.base_url), timeout=cfg.timeout_s)
        self.failures = 0
        self._answer_ids: dict[tuple[str, str], asyncio.Future[list[int]]] = {}

    async def close(self) -> None:
        await self._oai.close()
        await self._http.aclose()

    async def __aenter__(self) -> EvalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _delay(self, attempt: int) -> float:
        return min(self.cfg.backoff_s * (2**attempt), self.cfg.backoff_max_s)

    async def check(self) -> str:
        """Wait for ``/health`` (up to ``health_timeout_s``), then resolve the served model name."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.health_timeout_s
        attempt = 0
        last = ""
        while True:
            try:
                r = await self._http.get("/health")
                if r.status_code == 200:
                    break
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if loop.time() >= deadline:
                raise ServerUnreachableError(
                    f"server at {self.cfg.base_url} not healthy after {self.cfg.health_timeout_s:.0f}s "
                    f"(last: {last}); is `vllm serve ... --kv-eviction namm` running there?"
                )
            await asyncio.sleep(min(self._delay(attempt), max(deadline - loop.time(), 0.0)))
            attempt += 1
        try:
            models = [m.id async for m in self._oai.models.list()]
        except openai.APIError as e:
            raise ServerRequestError(f"GET {self.cfg.base_url}/models failed: {e}") from None
        if self.model is None:
            if not models:
                raise ServerRequestError(f"server at {self.cfg.base_url} serves no model")
            self.model = models[0]
        elif self.model not in models:
            raise ServerRequestError(
                f"server.model {self.model!r} is not served at {self.cfg.base_url}; it serves {models}"
            )
        return self.model

    async def complete(
        self, prompt: str, max_tokens: int, xargs: dict[str, Any], temperature: float = 0.0
    ) -> GenerationResult:
        """One completion with the given per-request settings; see the module doc for failures."""
        return await self._request(prompt, max_tokens, xargs, temperature, answer_ids=None)

    async def answer_logprob(self, prompt: str, answer: str, xargs: dict[str, Any]) -> GenerationResult:
        """Teacher-forced mean log-probability per token of ``answer`` after ``prompt``, under the
        request's eviction settings (the answer is part of the prompt; ``prompt_logprobs``).

        Every eviction step of the prompt's n_up boundaries before the answer runs before the
        answer's tokens are computed, so their probabilities are those of the evicted cache.
        """
        key = (prompt, answer)
        if key not in self._answer_ids:  # the same for every candidate of a generation: ask once
            self._answer_ids[key] = asyncio.ensure_future(self._answer_token_ids(prompt, answer))
        return await self._request(prompt + answer, 1, xargs, 0.0, answer_ids=await self._answer_ids[key])

    async def _answer_token_ids(self, prompt: str, answer: str) -> list[int]:
        n_prompt = len(await self.tokenize(prompt))
        full = await self.tokenize(prompt + answer)
        if len(full) <= n_prompt:
            raise ValueError(f"answer {answer!r} adds no token to the prompt")
        return full[n_prompt:]

    async def tokenize(self, text: str) -> list[int]:
        """The server tokenizer's ids of ``text`` (with the special tokens a prompt gets)."""
        r = await self._http.post("/tokenize", json={"model": self.model, "prompt": text})
        r.raise_for_status()
        return r.json()["tokens"]

    async def _request(
        self,
        prompt: str,
        max_tokens: int,
        xargs: dict[str, Any],
        temperature: float,
        answer_ids: list[int] | None,
    ) -> GenerationResult:
        if self.model is None:
            raise RuntimeError("call check() first (resolves the model name)")
        attempts = self.cfg.retries + 1
        connect_failures = 0
        last = ""
        body: dict[str, Any] = {"vllm_xargs": xargs}
        if answer_ids is not None:
            body["prompt_logprobs"] = 0
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._delay(attempt - 1))
            try:
                async with self._sem:
                    resp = await self._oai.completions.create(
                        model=self.model,
                        prompt=prompt,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        extra_body=body,
                    )
                extra = resp.model_extra or {}
                text = resp.choices[0].text
                if answer_ids is not None:
                    text = repr(
                        answer_mean_logprob(
                            (resp.choices[0].model_extra or {}).get("prompt_logprobs"), answer_ids
                        )
                    )
                namm = (extra.get("kv_transfer_params") or {}).get("namm") or {}
                return GenerationResult(
                    text=text,
                    retained_fraction=retained_fraction_of(extra.get("kv_transfer_params")),
                    attempts=attempt + 1,
                    eviction_steps=namm.get("eviction_steps"),
                    last_eviction_at=namm.get("last_eviction_at"),
                )
            except openai.APITimeoutError as e:
                last = f"timeout after {self.cfg.timeout_s:g}s ({e})"
            except openai.APIConnectionError as e:
                connect_failures += 1
                last = f"connection error: {e}"
            except openai.BadRequestError as e:
                raise BadSettingError(
                    f"server rejected the request settings ({_describe_xargs(xargs)}; max_tokens={max_tokens}): "
                    f"{_status_message(e)}"
                ) from None
            except openai.APIStatusError as e:
                if e.status_code >= 500 or e.status_code == 429:
                    last = f"HTTP {e.status_code}: {_status_message(e)}"
                else:
                    raise ServerRequestError(
                        f"HTTP {e.status_code} from {self.cfg.base_url}: {_status_message(e)}"
                    ) from None
        if connect_failures == attempts:
            raise ServerUnreachableError(
                f"cannot reach the server at {self.cfg.base_url} after {attempts} attempts "
                f"(backoff {self.cfg.backoff_s:g}s doubling): {last}"
            )
        self.failures += 1
        if self.failures <= 5 or self.failures % 100 == 0:  # a dead server fails thousands at once
            log.warning(
                "request failed after %d attempts, counted as a failure (%d so far%s): %s",
                attempts,
                self.failures,
                "; further ones are summarised per generation" if self.failures == 5 else "",
                last,
            )
        return GenerationResult(text=None, ok=False, error=last, attempts=attempts)

    async def truncate_middle(self, prompt: str, max_tokens: int) -> str:
        """LongBench's middle truncation, with the *server's* tokenizer (``/tokenize``, ``/detokenize``)."""
        r = await self._http.post(
            "/tokenize", json={"model": self.model, "prompt": prompt, "add_special_tokens": False}
        )
        r.raise_for_status()
        tokens = r.json()["tokens"]
        if len(tokens) <= max_tokens:
            return prompt
        half = max_tokens // 2
        texts = []
        for part in (tokens[:half], tokens[-half:]):
            d = await self._http.post("/detokenize", json={"model": self.model, "tokens": part})
            d.raise_for_status()
            texts.append(d.json()["prompt"])
        return texts[0] + texts[1]


def answer_mean_logprob(prompt_logprobs: Any, answer_ids: list[int]) -> float:
    """Mean log-probability of the prompt's last tokens ``answer_ids``, from vLLM's ``prompt_logprobs``
    (per position a ``{token_id: {"logprob": ...}}`` that holds the actual token; the first is None)."""
    n = len(answer_ids)
    if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) < n + 1:
        raise ServerRequestError(
            "the server returned no prompt_logprobs (vLLM too old, or not the completions API)"
        )
    total = 0.0
    for pos, token in zip(prompt_logprobs[-n:], answer_ids, strict=True):
        entry = pos.get(str(token), pos.get(token)) if isinstance(pos, dict) else None
        if entry is None:
            raise ServerRequestError(f"prompt_logprobs lack the answer token {token}")
        total += float(entry["logprob"])
    return total / n


def _status_message(e: openai.APIStatusError) -> str:
    """The server's own error message (vLLM puts it in ``{"error": {"message": ...}}`` or ``message``)."""
    body = e.body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return str(e)
