"""An OpenAI-compatible chat-completions server over a real local causal LM, for the tests of the
OpenAI judge client: `POST /v1/chat/completions` with messages, max_tokens, logprobs and
top_logprobs, answered greedily in the standard response shape. It checks the Bearer key (401 with
an OpenAI-style error body otherwise) and can be told to answer late (`delay`), or to drop the
log-probabilities and answer fixed text (`fixed_text`).

Also `save_tiny_judge`: a tiny causal LM whose vocabulary spells the verdicts ("A", "B", "Yes",
"No") and which answers nothing else, so that its verdict is always among the top log-probabilities.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import tokenizers
import torch
import transformers

from training.ppo import load_policy, prompt_ids

VERDICT_WORDS = ["A", "B", "Yes", "No"]
JUDGE_WORDS = [*VERDICT_WORDS, "banana", "question", *(f"w{i}" for i in range(10))]


def save_tiny_judge(path: str, *, always_first: bool = False) -> str:
    """A saved tiny Llama (and tokenizer) that only ever says "A", "B", "Yes" or "No", which one
    depending on its input through random weights (seed 0, the same on every machine).

    Residual dimension 0 is held at 1 (embeddings 1 there, no layer writes to it), and the output
    row of every other token is -30 on it, so other tokens are millions of times less likely.
    With always_first, "A" gets +10 there too: a judge blind to the content that always prefers the
    first answer it is shown, the extreme of position bias."""
    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<eos>", *JUDGE_WORDS])}
    model_tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model_tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    transformers.set_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"], bos_token_id=None,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = model.lm_head.weight
        verdicts = [vocab[word] for word in VERDICT_WORDS]
        head[verdicts, 1:] *= 100.0  # logit gaps of about one between the verdicts, so that the input matters
        head[:, 0] = -30.0
        head[verdicts, 0] = 0.0
        if always_first:
            head[vocab["A"], 0] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class OpenAIServer:
    """The running server; change `delay` or `fixed_text` between requests to change its answers."""

    base_url: str
    api_key: str
    delay: float = 0.0
    fixed_text: str | None = None  # answered instead of the model's reply, with no log-probabilities
    requests: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def serve(model_path: str, *, api_key: str = "test-key") -> Iterator[OpenAIServer]:
    """The server on a free port of 127.0.0.1 in a thread, for the duration of the block."""
    model, tokenizer = load_policy(model_path, torch.device("cpu"))
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    lock = threading.Lock()  # one request at a time on the model

    def complete(body: dict[str, Any]) -> dict[str, Any]:
        max_tokens = int(body.get("max_tokens") or 16)
        ids = torch.tensor([prompt_ids(tokenizer, body["messages"], max(context - max_tokens, 1))])
        with lock, torch.no_grad():
            output = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # type: ignore[operator]  # fmt: skip
        new = output.sequences[0, ids.shape[1] :].tolist()
        top = min(int(body.get("top_logprobs") or 0), 20)
        logprobs = []
        for token, logits in zip(new, output.logits, strict=True):
            log_softmax = torch.log_softmax(logits[0].float(), dim=-1)
            best = torch.topk(log_softmax, k=min(top, log_softmax.numel()))
            candidates = zip(best.indices.tolist(), best.values.tolist(), strict=True)
            entry = _token_entry(str(tokenizer.decode([token])), log_softmax[token].item())
            entry["top_logprobs"] = [_token_entry(str(tokenizer.decode([index])), value) for index, value in candidates]
            logprobs.append(entry)
        return {
            "message": {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)},
            "logprobs": {"content": logprobs} if body.get("logprobs") else None,
            "finish_reason": "stop" if new and new[-1] == tokenizer.eos_token_id else "length",
        }

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._answer(404, _error(f"no route {self.path}", "invalid_request_error", None))
            if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                return self._answer(
                    401, _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
                )
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            server.requests.append(body)
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                return self._answer(400, _error("'messages' is required", "invalid_request_error", None))
            time.sleep(server.delay)
            if server.fixed_text is not None:
                choice = {"message": {"role": "assistant", "content": server.fixed_text}, "logprobs": None,
                          "finish_reason": "stop"}  # fmt: skip
            else:
                choice = complete(body)
            self._answer(200, {
                "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""), "choices": [{"index": 0, **choice}],
            })  # fmt: skip

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (the timeout tests)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    http.daemon_threads = True
    http.block_on_close = False  # a delayed answer still sleeping must not hold up the test's end
    server = OpenAIServer(base_url=f"http://127.0.0.1:{http.server_address[1]}/v1", api_key=api_key)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _error(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
