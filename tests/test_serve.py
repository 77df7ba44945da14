"""`snug serve` driven as a client would drive it: the official `openai` package against a server
on a loopback port. Answers are checked against `snug generate` (the CLI, in this process) and
against transformers' own unbatched greedy decoding; tool calls against LLaMA-Factory's texts."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from snug.cli import main
from snug.data.templates import BUILTIN
from snug.deploy.api import Served, build_app
from snug.deploy.engine import Engine, Job
from snug.deploy.serve import allow_origins, listen
from snug.deploy.session import open_session
from snug.deploy.toolcalls import ToolFormat
from snug.deploy.wire import Limits

from conftest import ROOT

BASE = ROOT / "models/tiny"
TEMPLATE = "qwen"  # a built-in that writes tools (the tiny base's own template does not)
PROMPTS = [
    "Say hi",
    "Tell me a story about the sea",
    "Count to ten",
    "hello there",
    "Write a very long sentence about the sea and the sky",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny base with random (nonzero) weights: each answers
    differently from the base and from the other."""
    out = tmp_path_factory.mktemp("adapters")
    found = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(BASE)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False,
        )
        get_peft_model(model, config).save_pretrained(out / name)
        found[name] = out / name
    return found


def session_args(adapters) -> list[str]:
    args = ["--model", str(BASE), "--template", TEMPLATE]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return args


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    """`snug serve` as a user starts it, on a free loopback port; its URL once ready."""
    log = tmp_path_factory.mktemp("serve") / "log"
    command = [sys.executable, "-m", "snug.cli", "serve", *session_args(adapters), "--port", "0"]
    command += ["--max-request-bytes", "20000"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while "ready on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        line = next(x for x in log.read_text().splitlines() if "ready on" in x)
        yield line.split("ready on ")[1].split()[0], log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def http(url: str, data: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain request, as curl would send it."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def chat(c: openai.OpenAI, model: str, prompt: str, stream: bool = False, **kw) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        got = c.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_NEW, temperature=0, **kw
        )
        return got.choices[0].message.content
    pieces = c.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_NEW, temperature=0, stream=True, **kw
    )
    return "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)


@pytest.fixture(scope="module")
def generated(adapters, tmp_path_factory) -> dict[str, list[str]]:
    """`snug generate`'s greedy answers to PROMPTS, for the base and each adapter."""
    folder = tmp_path_factory.mktemp("generate")
    source = folder / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    answers = {}
    for model in ("base", *adapters):
        out = folder / f"{model}.jsonl"
        argv = ["generate", *session_args(adapters), "--use", model, "--input", str(source)]
        argv += ["--output", str(out), "--max-new-tokens", str(MAX_NEW), "--batch-size", "2"]
        assert main(argv) == 0
        answers[model] = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    assert len({tuple(a) for a in answers.values()}) == 3  # three models, three sets of answers
    return answers


def test_answers_equal_snug_generate_whole_and_streamed_under_concurrent_mixed_load(
    server, generated
):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == ["base", "a", "b"]
    asks = [(m, i, s) for s in (False, True) for m in generated for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(asks)) as pool:  # all at once: they share batches
        got = list(pool.map(lambda a: chat(c, a[0], PROMPTS[a[1]], a[2]), asks))
    for (model, i, stream), answer in zip(asks, got, strict=True):
        assert answer == generated[model][i], (model, PROMPTS[i], stream)
    health = http(f"{url}/health")[1]
    assert health["status"] == "ok" and health["failed"] == 0
    assert health["batches"] < len(asks)  # some requests were answered together


def test_refusals_are_openai_errors_naming_what_is_wrong(server):
    url, log = server
    c = client(url)
    with pytest.raises(openai.NotFoundError, match="serves: base, a, b"):
        chat(c, "c", "hi")
    with pytest.raises(openai.BadRequestError, match="'temperature' must be from 0 to 2"):
        chat(c, "a", "hi", extra_body={"temperature": 5})
    with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
        chat(c, "a", "hi", n=2)
    picture = [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]
    with pytest.raises(openai.BadRequestError, match="fetches nothing"):
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": picture}])
    with pytest.raises(openai.BadRequestError, match="overflow the model's"):
        chat(c, "a", "word " * 600)
    with pytest.raises(openai.APIStatusError, match="larger than 20,000 bytes") as e:
        chat(c, "a", "x" * 30000)
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="1 to 256 characters"):
        chat(c, "a", "hi", stop=["x" * 257])
    with pytest.raises(openai.BadRequestError, match="the queue holds 64"):
        c.completions.create(model="a", prompt=["hi"] * 65, max_tokens=1)
    assert c.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("c")
    status, bad = http(f"{url}/v1/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in bad["error"]["message"]
    assert "POST /v1/chat/completions model=a" in log.read_text()  # requests are logged,
    assert "word word" not in log.read_text()  # their prompts not without --log-prompts


def test_tools_reach_the_template(server):
    """The prompt with tools is as many tokens as transformers renders it with the same tools."""
    from transformers import AutoTokenizer

    url, _ = server
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "the weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    c = client(url)
    got = c.chat.completions.create(model="a", messages=messages, tools=tools, max_tokens=2)
    plain = c.chat.completions.create(model="a", messages=messages, max_tokens=2)
    tok = AutoTokenizer.from_pretrained(BASE)
    text = tok.apply_chat_template(
        messages,
        tools=tools,
        chat_template=BUILTIN[TEMPLATE],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "get_weather" in text
    assert got.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    assert got.usage.prompt_tokens > plain.usage.prompt_tokens + 20


# --- the same app in this process, where a test can hold the engine ---------------------------


@pytest.fixture(scope="module")
def session(adapters):
    return open_session(str(BASE), [f"{n}={p}" for n, p in adapters.items()], template=TEMPLATE)


@contextlib.contextmanager
def serving(session, engine, limits=None, origins=(), **served):
    import uvicorn

    state = Served(limits or Limits(), **served)
    state.ready(session, engine)
    sock = listen("127.0.0.1", 0)
    app = build_app(state)
    if origins:
        allow_origins(app, list(origins))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()


def gated(engine: Engine) -> threading.Event:
    """Hold the engine's batches until the returned event is set (a slow model, on demand)."""
    gate, run = threading.Event(), engine._generate
    engine._generate = lambda batch: (gate.wait(30), run(batch))
    return gate


def wait_for(url: str, **counts) -> None:
    deadline = time.monotonic() + 20
    while any(http(f"{url}/health")[1][k] != v for k, v in counts.items()):
        assert time.monotonic() < deadline, http(f"{url}/health")
        time.sleep(0.05)


def test_a_key_is_required_when_set(session):
    with serving(session, Engine(session), api_key="s3cret-key") as url:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            chat(client(url, "wrong-key!"), "a", "hi")
        assert http(f"{url}/v1/models")[0] == 401
        assert chat(client(url, "s3cret-key"), "a", "hi")


def test_a_full_queue_answers_429_and_a_gone_client_frees_its_slot(session):
    engine = Engine(session, max_batch=1, max_queue=1)
    gate = gated(engine)
    jobs: list[Job] = []
    submit = engine.submit
    engine.submit = lambda job: (jobs.append(job), submit(job))[1]
    with serving(session, engine) as url, ThreadPoolExecutor(2) as pool:
        c = client(url)
        stream = c.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True
        )
        next(iter(stream))  # the first chunk: the request runs (held at the gate)
        wait_for(url, running=1, waiting=0)
        second = pool.submit(chat, c, "b", "hello")
        wait_for(url, running=1, waiting=1)
        with pytest.raises(openai.RateLimitError, match="busy"):
            chat(c, "base", "hi")
        stream.close()  # the client goes away mid-stream
        assert jobs[0].cancelled.wait(20)  # the server hears it and cancels its job
        gate.set()
        assert second.result(timeout=60)  # the slot it held went to the one waiting
        wait_for(url, running=0, waiting=0, cancelled=1)
    assert jobs[0].finish_reason == "cancelled" and len(jobs[0].tokens) <= 1


class Scripted:
    """An engine that answers every job with `text`, in pieces: the API's side alone."""

    def __init__(self, text: str):
        self.text = text

    def submit(self, job: Job) -> None:
        for k in range(0, len(self.text), 5):
            job.emit(self.text[k : k + 5])
        job.text, job.tokens, job.finish_reason = self.text, [0] * 9, "stop"
        job.finish(job)

    def cancel(self, job):
        pass

    def close(self):
        pass

    def status(self):
        return {"running": 0, "waiting": 0}


# LLaMA-Factory's tool-call extractor inputs (tests/data/test_formatter.py,
# test_qwen_multi_tool_extractor, test_llama3_tool_extractor, test_mistral_multi_tool_extractor)
LF_QWEN = (
    """<tool_call>\n{"name": "test_tool", "arguments": {"foo": "bar", "size": 10}}\n</tool_call>\n"""
    """<tool_call>\n{"name": "another_tool", "arguments": {"foo": "job", "size": 2}}\n</tool_call>"""
)
LF_LLAMA3 = """{"name": "test_tool", "parameters": {"foo": "bar", "size": 10}}\n"""
LF_MISTRAL = (
    """[{"name": "test_tool", "arguments": {"foo": "bar", "size": 10}}, """
    """{"name": "another_tool", "arguments": {"foo": "job", "size": 2}}]"""
)
LF_CALLS = [("test_tool", {"foo": "bar", "size": 10}), ("another_tool", {"foo": "job", "size": 2})]


@pytest.mark.parametrize(
    "fmt, text, calls",
    [
        ("qwen", LF_QWEN, LF_CALLS),
        ("llama3", LF_LLAMA3, LF_CALLS[:1]),
        ("mistral", LF_MISTRAL, LF_CALLS),
        ("mistral", "[TOOL_CALLS] " + LF_MISTRAL, LF_CALLS),
    ],
)
def test_tool_calls_are_read_back_as_llamafactory_extracts_them(fmt, text, calls):
    content, found = ToolFormat(fmt).parse(text)
    assert content == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] == calls
    assert ToolFormat(fmt).held(text) == 0  # a streamed answer holds the whole call back


def test_text_without_a_call_stays_text():
    for fmt in ("qwen", "llama3", "mistral"):
        assert ToolFormat(fmt).parse("The weather is fine.") == ("The weather is fine.", [])
    assert ToolFormat("qwen").held("Let me look. <tool") == len("Let me look.")


def test_tool_calls_come_back_in_openais_shape_whole_and_streamed(session):
    tools = [{"type": "function", "function": {"name": "test_tool", "parameters": {}}}]
    messages = [{"role": "user", "content": "use the tools"}]
    with serving(session, Scripted("Looking.\n" + LF_QWEN)) as url:
        c = client(url)
        got = c.chat.completions.create(model="a", messages=messages, tools=tools)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Looking."
        calls = [
            (t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls
        ]
        assert calls == LF_CALLS
        text, named, reason = "", [], None
        for piece in c.chat.completions.create(
            model="a", messages=messages, tools=tools, stream=True
        ):
            delta = piece.choices[0].delta
            text += delta.content or ""
            named += [
                (t.function.name, json.loads(t.function.arguments)) for t in delta.tool_calls or []
            ]
            reason = piece.choices[0].finish_reason or reason
        assert (text, named, reason) == ("Looking.", LF_CALLS, "tool_calls")


def test_a_mixed_adapter_batch_answers_as_each_model_alone(session):
    """Requests for the base and both adapters in one batch: each greedy answer is
    transformers' unbatched greedy answer of that model; a sampled one is its seed's draw
    whatever shares its batch."""
    from snug.train.evaluate import stop_token_ids

    engine = Engine(session)
    prompts = [session.prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    models = ["base", "a", "b", "a", "base", "b"]

    def job(model, ids, **kw):
        return Job(model, ids, MAX_NEW, emit=lambda _: None, finish=lambda _: None, **kw)

    batch = [job(m, prompts[i % len(prompts)]) for i, m in enumerate(models)]
    sampled = job("b", prompts[1], temperature=0.9, top_p=0.9, seed=7)
    engine._generate([*batch, sampled])  # the engine's thread waits for jobs meanwhile
    stops = stop_token_ids(session.model, session.tok, session.template)
    for row in batch:
        ids = torch.tensor([row.prompt])
        session.use(row.model)
        with torch.no_grad(), session.scope():
            out = session.model.generate(
                input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops
            )
        assert row.tokens == out[0, ids.shape[1] :].tolist()[: len(row.tokens)], row.model
        assert len(row.tokens) == min(MAX_NEW, out.shape[1] - ids.shape[1])
    alone = job("b", prompts[1], temperature=0.9, top_p=0.9, seed=7)
    engine._generate([alone])
    assert alone.tokens == sampled.tokens
    engine.close()


def test_refused_before_starting(tmp_path, capsys):
    assert main(["serve", "--model", str(BASE), "--host", "0.0.0.0"]) == 2
    assert "without a key" in capsys.readouterr().err
    key = tmp_path / "key"
    key.write_text("")
    assert main(["serve", "--model", str(BASE), "--api-key-file", str(key)]) == 2
    assert "first line is empty" in capsys.readouterr().err
    assert main(["serve", "--model", str(BASE), "--engine", "vllm"]) == 2
    assert "pip install vllm" in capsys.readouterr().err
    taken = listen("127.0.0.1", 0)
    # asyncio sets TCP_NODELAY only on the connections of a socket made for TCP by name: without
    # it each answer waited ~40 ms for the client's delayed ACK (44 ms per /v1/models call with
    # the openai client, 1 ms with it)
    assert taken.proto == socket.IPPROTO_TCP
    port = str(taken.getsockname()[1])
    assert main(["serve", "--model", str(BASE), "--port", port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    taken.close()


def test_a_request_past_its_time_limit_is_a_504(session):
    engine = Engine(session)
    gate = gated(engine)
    with serving(session, engine, Limits(timeout_s=0.5)) as url:
        threading.Timer(1.0, gate.set).start()  # the model answers after the limit
        with pytest.raises(openai.InternalServerError, match="timed out") as e:
            chat(client(url), "a", "hi")
        assert e.value.status_code == 504
        wait_for(url, timed_out=1, running=0)


def test_vllm_is_started_with_snugs_base_adapters_template_and_defaults(adapters, tmp_path):
    """`--engine vllm` (on a GPU with vLLM) runs vLLM's server with what snug resolved; here the
    command is checked (vLLM is not installed on a CPU machine)."""
    from snug.cli import build_parser
    from snug.deploy.vllm import vllm_command

    argv = ["serve", *session_args(adapters), "--engine", "vllm", "--api-key", "k" * 12]
    command = vllm_command(build_parser().parse_args(argv), tmp_path)
    flags = " ".join(command)
    assert command[command.index("--model") + 1] == str(BASE.resolve())
    assert "--served-model-name base --host 127.0.0.1 --port 8000" in flags
    assert "--allowed-origins []" in flags  # vLLM's own default allows every origin
    assert f"--lora-modules a={adapters['a']} b={adapters['b']}" in flags
    assert "--max-lora-rank 8" in flags  # r=4, rounded up to a rank vLLM takes
    template = Path(command[command.index("--chat-template") + 1])
    assert template.read_text() == BUILTIN[TEMPLATE]
    assert "--tool-call-parser hermes" in flags  # vLLM's parser of Qwen's <tool_call>
    assert "k" * 12 not in flags  # the key goes by environment, out of `ps`


def test_prompt_learning_adapters_are_answered_one_request_at_a_time(tmp_path):
    """peft generates a prompt-tuning adapter's answers wrong from a padded batch or a KV cache
    (snug/train/evaluate.py: prompt_learning): the server answers them one by one, uncached,
    each as whole forward passes of the model give it."""
    from peft import PromptTuningConfig

    from snug.train.evaluate import stop_token_ids

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    get_peft_model(model, config).save_pretrained(tmp_path / "virtual")
    session = open_session(adapters=[f"v={tmp_path / 'virtual'}"], device="cpu")
    engine = Engine(session)
    assert (engine.max_batch, engine.mixable) == (1, False)
    prompts = [session.prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS[:3]]
    done = threading.Semaphore(0)
    jobs = [Job("v", p, 6, lambda _: None, lambda _: done.release()) for p in prompts]
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=60)
    engine.close()
    assert engine.counts["batches"] == 3
    stops = stop_token_ids(session.model, session.tok, session.template)
    for job in jobs:
        ids = list(job.prompt)
        with torch.no_grad():
            while len(ids) < len(job.prompt) + 6:
                ids.append(int(session.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] in stops:
                    break
        assert job.tokens == ids[len(job.prompt) :]


def test_tools_for_a_template_that_cannot_write_them_are_refused():
    plain = open_session(str(BASE), template="chatml", device="cpu")
    tools = [{"type": "function", "function": {"name": "test_tool", "parameters": {}}}]
    with serving(plain, Scripted("hi")) as url:
        with pytest.raises(openai.BadRequestError, match="does not write tools"):
            client(url).chat.completions.create(
                model="base", messages=[{"role": "user", "content": "hi"}], tools=tools
            )
        assert chat(client(url), "base", "hi") == "hi"  # without tools it answers


def test_one_requests_sampling_cannot_fail_the_others_in_its_batch(session):
    """A temperature so small that dividing by it overflows float32 is greedy (as vLLM takes
    temperatures below 1e-5), not a NaN that fails every request of its batch."""
    engine = Engine(session)
    ids = session.prompt_ids([{"role": "user", "content": PROMPTS[0]}])

    def job(model, **kw):
        return Job(model, ids, MAX_NEW, emit=lambda _: None, finish=lambda _: None, **kw)

    other, tiny, greedy = job("base"), job("a", temperature=1e-40, seed=1), job("a")
    engine._generate([other, tiny])
    engine._generate([greedy])
    engine.close()
    assert other.finish_reason in ("stop", "length") and other.tokens
    assert (tiny.finish_reason, tiny.tokens) == (greedy.finish_reason, greedy.tokens)


def test_a_seed_torch_cannot_take_is_refused(session):
    """torch's generators take 64-bit seeds: a larger one failed its whole batch (a 500 for
    every request in it)."""
    messages = [{"role": "user", "content": "hi"}]
    with serving(session, Engine(session)) as url:
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="'seed'"):
            c.chat.completions.create(model="a", messages=messages, seed=2**64, max_tokens=2)
        got = c.chat.completions.create(model="a", messages=messages, seed=2**64 - 1, max_tokens=2)
        assert got.choices[0].finish_reason in ("stop", "length")


def test_bodies_json_cannot_hold_are_a_400_not_a_500(session):
    with serving(session, Scripted("hi")) as url:
        for body in (b"[" * 5000, b'{"seed": ' + b"9" * 5000 + b"}"):
            status, got = http(f"{url}/v1/chat/completions", body)
            assert status == 400 and "not JSON" in got["error"]["message"], got


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_waiting_past_its_time_limit_is_a_504_at_its_limit(session, stream):
    """The limit holds while a request waits behind a batch (or its batch's first step) that
    takes longer: the client hears 504 at its limit, not when the batch ends."""
    engine = Engine(session)
    gate = gated(engine)
    with serving(session, engine, Limits(timeout_s=1.0)) as url:
        started = time.monotonic()  # (the gate holds the batch for 30 s)
        with pytest.raises(openai.APIError, match="timed out"):
            chat(client(url), "a", "hi", stream=stream)
        assert time.monotonic() - started < 4
        gate.set()
        wait_for(url, timed_out=1, running=0, waiting=0)


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(session):
    """Not streamed: a client gone while its request waits frees its place in the queue, and
    one gone while its request runs stops its row."""
    engine = Engine(session, max_batch=1)
    gate = gated(engine)
    with serving(session, engine) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=2.0)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, c, "a", "hi")
            wait_for(url, running=1)
            second = pool.submit(chat, c, "b", "hello")
            wait_for(url, waiting=1)
            for call in (first, second):
                with pytest.raises(openai.APITimeoutError):
                    call.result(timeout=30)
        wait_for(url, waiting=0, cancelled=1)
        gate.set()
        wait_for(url, running=0, cancelled=2)


def test_a_named_origin_may_call_with_the_headers_of_openais_browser_client(session):
    """openai-node sends x-stainless-* headers from a browser: the preflight naming them passes
    for an origin that --cors-origin names, and no other origin is let in."""
    asked = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,"
        "x-stainless-retry-count,x-stainless-timeout",
    }

    def preflight(url, origin):
        request = urllib.request.Request(
            f"{url}/v1/chat/completions", method="OPTIONS", headers={"Origin": origin, **asked}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("access-control-allow-origin")

    with serving(session, Scripted("hi"), origins=["https://app.example"]) as url:
        assert preflight(url, "https://app.example") == (200, "https://app.example")
        assert preflight(url, "https://other.example")[1] is None


def test_text_completions_whole_and_streamed_agree(server):
    from transformers import AutoTokenizer

    url, _ = server
    c = client(url)
    prompts = ["Once upon a time", "The sea and the sky"]
    whole = c.completions.create(model="b", prompt=prompts, max_tokens=8, temperature=0)
    assert whole.usage.prompt_tokens == sum(
        len(AutoTokenizer.from_pretrained(BASE)(p)["input_ids"]) for p in prompts
    )
    texts = ["", ""]
    for piece in c.completions.create(
        model="b", prompt=prompts, max_tokens=8, temperature=0, stream=True
    ):
        for choice in piece.choices:
            texts[choice.index] += choice.text
    assert texts == [choice.text for choice in sorted(whole.choices, key=lambda x: x.index)]
    assert texts[0] and texts[0] != texts[1]
