"""Resuming a relayed (vLLM) stream on this replica after the proxy lost the replica that began it: the
pure part (no vLLM import, no socket), used by model_proc.vllm_serving inside model_proc's asyncio loop.

How a relayed stream is resumed (docs/api.md, "Replica failure mid-stream"):
- the first replica reports, with each SSE chunk it sends, the ids of the tokens whose text that chunk
  completed (`Delta.token_ids`), only for requests `refusal` accepts;
- the proxy sends the same body to another replica with those ids (`GenerateRequest.resume`) and the
  `created` of the stream the client has;
- that replica runs the body through vLLM's serving layer as usual, but the engine request it makes
  gets the resumed ids appended to its prompt, so vLLM's incremental detokenizer starts after them (text
  at the seam is right), and `max_tokens` / `min_tokens` reduced by their count (`continued`);
- its SSE chunks are made to continue the client's stream (`continue_events`): no second role chunk,
  the first stream's `created` (the id is the same already: vLLM derives it from X-Request-ID, which is
  the proxy's request id), usage counting the resumed tokens as completion tokens, not prompt tokens.

With greedy decoding the client's stream is then the one an uninterrupted run gives. Sampled requests
go on as a valid sample, not the same one (a seed restarts its random stream; presence and frequency
penalties see the resumed tokens as prompt).
"""
from __future__ import annotations

import json
from typing import Any, Optional

RESUMABLE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
# request fields whose effect a resumed continuation cannot reproduce (why, in `refusal`)
_REFUSED_FIELDS = {
    "tools": "tool calls are parsed from the whole output",
    "functions": "tool calls are parsed from the whole output",
    "structured_outputs": "structured outputs constrain the whole output",
    "guided_json": "structured outputs constrain the whole output",
    "guided_regex": "structured outputs constrain the whole output",
    "guided_choice": "structured outputs constrain the whole output",
    "guided_grammar": "structured outputs constrain the whole output",
    "echo": "the echoed prompt would be sent again",
    "return_token_ids": "the prompt's token ids would include the resumed ones",
    "prompt_logprobs": "the prompt's logprobs would include the resumed tokens",
    "stop": "text held back for a stop string is not in the ids reported as sent",
    "use_beam_search": "beam search",
}


def refusal(endpoint: str, body: Any, reasoning_parser: bool) -> Optional[str]:
    """Why a relayed request cannot be resumed elsewhere, or None when it can (subject to the engine
    request's own checks in `continued`). `body` is the parsed JSON body."""
    if endpoint not in RESUMABLE_ENDPOINTS:
        return "%s requests are not resumed" % endpoint
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if not body.get("stream"):
        return "only streamed requests are resumed (the others start over)"
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "n > 1"
    for key, why in _REFUSED_FIELDS.items():
        if body.get(key):
            return "%s: %s" % (key, why)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        return "response_format: structured outputs constrain the whole output"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(t, int) for t in prompt):
        return "several prompts"
    if reasoning_parser and endpoint == "/v1/chat/completions":
        return "the deployment's reasoning parser splits the whole output"
    return None


def continued(prompt: Any, sampling: Any, resumed: list[int]) -> tuple[Any, Any]:
    """(engine prompt, sampling params) that continue after `resumed`: the ids appended to a token
    prompt (a TokensInput dict), max_tokens and min_tokens reduced by their count. Raises ValueError
    when the engine request cannot be continued (not a token prompt, n > 1, structured outputs, stop
    strings, nothing left to generate)."""
    if not isinstance(prompt, dict) or prompt.get("type", "token") != "token" or "prompt_token_ids" not in prompt:
        raise ValueError("cannot resume: the engine prompt is not a token prompt")
    if sampling.n != 1 or getattr(sampling, "structured_outputs", None) is not None:
        raise ValueError("cannot resume: n > 1 or structured outputs")
    if sampling.stop and not sampling.include_stop_str_in_output:
        raise ValueError("cannot resume: stop strings")
    left = (sampling.max_tokens or 0) - len(resumed)
    if left < 1:
        raise ValueError("cannot resume: no tokens left to generate")
    new_prompt = {k: v for k, v in prompt.items() if k not in ("prompt", "prompt_token_offsets")}
    new_prompt["prompt_token_ids"] = list(prompt["prompt_token_ids"]) + list(resumed)
    new_sampling = sampling.clone()
    new_sampling.max_tokens = left
    new_sampling.min_tokens = max(0, (sampling.min_tokens or 0) - len(resumed))
    return new_prompt, new_sampling


def reportable(sampling: Any) -> bool:
    """May the ids of this engine request's outputs be reported as sent with each chunk? Only when every
    output's text goes out with it (no text held back for a stop string) and there is one choice."""
    return sampling.n == 1 and not (sampling.stop and not sampling.include_stop_str_in_output)


def _is_role_only(chunk: dict[str, Any]) -> bool:
    """vLLM's first chat chunk: role "assistant", empty content, no finish."""
    choices = chunk.get("choices")
    if not choices:
        return False
    for choice in choices:
        delta = choice.get("delta") or {}
        if "role" not in delta or delta.get("content") or choice.get("finish_reason") is not None:
            return False
        if set(delta) - {"role", "content"}:
            return False
    return True


def continue_events(text: str, resumed: int, created: int) -> str:
    """vLLM's SSE events of a resumed request, made to continue the client's stream (module docstring).
    Events that are not JSON chunks (`data: [DONE]`) pass through."""
    out: list[str] = []
    for event in text.split("\n\n"):
        if not event.startswith("data: {"):
            if event:
                out.append(event)
            continue
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            out.append(event)
            continue
        if not isinstance(chunk, dict):
            out.append(event)
            continue
        if _is_role_only(chunk):
            continue
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if isinstance(delta, dict):
                delta.pop("role", None)
        if created and "created" in chunk:
            chunk["created"] = created
        usage = chunk.get("usage")
        if isinstance(usage, dict) and "prompt_tokens" in usage:
            usage["prompt_tokens"] -= resumed
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + resumed
        out.append("data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")))
    return "".join(e + "\n\n" for e in out)
