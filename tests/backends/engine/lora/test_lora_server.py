"""LoRA adapters served by `taxiway serve` on the real default model, through real HTTP and the
official ``openai`` client: adapters listed as models, the trained ``french`` fixture answering in
French, runtime load/unload (vLLM's routes) under load with 0 failed requests, bad adapters
refused naming the file and the tensor."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import httpx
import openai
import pytest

from backends.engine.catalogue import default_home, pull
from backends.engine.lora.adapter import module_shapes
from backends.engine.model.config import ModelConfig
from tests.backends.engine.lora.lora_helpers import write_adapter_files

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "lora"
FRENCH = FIXTURES / "french"
#: SmolLM2-135M's shapes, for random adapters written without loading it
SMOLLM2 = ModelConfig(
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True,
)  # fmt: skip
FRENCH_WORDS = {"le", "la", "les", "est", "de", "des", "du", "une", "et", "en", "pour", "dans", "qui", "sont", "avec", "vous", "je", "il", "un", "à"}
ENGLISH_WORDS = {"the", "is", "of", "and", "a", "to", "in", "are", "it", "that", "with", "for", "you", "i"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())


def share(text: str, vocabulary: set[str]) -> float:
    found = words(text)
    return sum(w in vocabulary for w in found) / max(1, len(found))


def random_adapter(path: Path, seed: int) -> Path:
    return write_adapter_files(path, module_shapes(SMOLLM2), SMOLLM2.num_layers, targets=["q_proj", "v_proj"], r=8, seed=seed, std=0.02)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"french": FRENCH, **{f"r{i}": random_adapter(root / f"r{i}", seed=i) for i in range(1, 5)}}


# one thread: with two, libgomp's spin-waiting crawls when another process holds a core
@pytest.fixture(scope="module")
def lora_server(taxiway_server_module, adapters):  # type: ignore[no-untyped-def]
    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    configured = ", ".join(f'{name} = "{adapters[name]}"' for name in ("french", "r1", "r2", "r3"))
    config = f"""
        [[models]]
        name = "smollm2-135m-instruct"
        aliases = ["default"]
        backend = "engine"
        options = {{ model = "{path}", threads = 1, max_num_seqs = 16, kv_cache_tokens = 8192, lora = {{ max_loras = 2, max_cpu_loras = 3, adapters = {{ {configured} }} }} }}
    """
    server = taxiway_server_module(config, startup_timeout=120)
    server.wait_ready(timeout=300)
    return server


@pytest.fixture(scope="module")
def taxiway_server_module(tmp_path_factory):  # type: ignore[no-untyped-def]
    import contextlib

    from tests.conftest import serve_process

    with contextlib.ExitStack() as stack:
        yield lambda config, **kw: stack.enter_context(serve_process(config, tmp_path_factory.mktemp("srv"), **kw))


def test_adapters_are_models_rooted_in_the_base(lora_server) -> None:
    models = {m["id"]: m for m in httpx.get(f"{lora_server.base_url}/models").json()["data"]}
    for name in ("french", "r1", "r2", "r3"):
        assert models[name]["root"] == "smollm2-135m-instruct"
    assert models["default"]["root"] == "smollm2-135m-instruct"


def test_french_adapter_answers_in_french(lora_server) -> None:
    client = openai.OpenAI(base_url=lora_server.base_url, api_key="unused")
    for question in ("What is the capital of France?", "Tell me about cats."):
        answers = {}
        for model in ("french", "default"):
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=40
            )
            assert r.model == "smollm2-135m-instruct" or r.model == model
            answers[model] = r.choices[0].message.content or ""
        assert share(answers["french"], FRENCH_WORDS) > 0.25 > share(answers["french"], ENGLISH_WORDS), answers
        assert share(answers["default"], ENGLISH_WORDS) > 0.15 > share(answers["default"], FRENCH_WORDS), answers


async def _stream(client: httpx.AsyncClient, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16, "stream": True}
    async with client.stream("POST", "/chat/completions", json=body) as response:
        text = (await response.aread()).decode()
        if response.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
            return f"{model}: {response.status_code} {text[-300:]}"
        return ""


def test_load_and_unload_under_load(lora_server, adapters) -> None:
    """16 streams over 4 adapters (2 slots: they swap, and requests wait for one) while a fifth
    adapter loads and one with requests in flight unloads: 0 failed requests."""

    async def run() -> tuple[list[str], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=lora_server.base_url, timeout=300) as client:
            streams = [asyncio.create_task(_stream(client, name)) for _ in range(4) for name in ("french", "r1", "r2", "r3")]
            await asyncio.sleep(0.5)
            loaded = await client.post("/load_lora_adapter", json={"lora_name": "r4", "lora_path": str(adapters["r4"])})
            unloaded = await client.post("/unload_lora_adapter", json={"lora_name": "r3"})  # its 4 streams run on
            more = [asyncio.create_task(_stream(client, "r4")) for _ in range(4)]
            return [e for e in await asyncio.gather(*streams, *more) if e], loaded, unloaded

    failures, loaded, unloaded = asyncio.run(run())
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["root"] == "smollm2-135m-instruct"
    assert unloaded.status_code == 200, unloaded.text
    assert failures == []
    gone = httpx.post(f"{lora_server.base_url}/chat/completions", json={"model": "r3", "messages": [{"role": "user", "content": "Hi"}]})
    assert gone.status_code == 404 and "r3" in gone.json()["error"]["message"]
    models = {m["id"] for m in httpx.get(f"{lora_server.base_url}/models").json()["data"]}
    assert "r4" in models and "r3" not in models


def test_bad_adapters_are_refused(lora_server, tmp_path) -> None:
    url = lora_server.base_url
    shapes = module_shapes(SMOLLM2)
    shapes["v_proj"] = (576, 576)  # another base model's v_proj
    bad = write_adapter_files(tmp_path / "bad", shapes, SMOLLM2.num_layers, targets=["v_proj"], r=8)
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(bad)})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert str(bad / "adapter_model.safetensors") in message and "layers.0.self_attn.v_proj.lora_B.weight" in message
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "default", "lora_path": str(FRENCH)})
    assert r.status_code == 400 and "taken" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404


def test_a_gguf_adapter_answers_as_its_peft_directory(lora_server, tmp_path) -> None:
    """The trained ``french`` adapter converted to llama.cpp's GGUF adapter format (float32), loaded
    at run time: the same greedy answer as the PEFT directory it came from."""
    from tests.backends.engine.lora.test_gguf_adapter import to_gguf

    gguf_file = to_gguf(FRENCH, tmp_path / "french.gguf", heads=(SMOLLM2.num_heads, SMOLLM2.num_kv_heads))
    url = lora_server.base_url
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "french-gguf", "lora_path": str(gguf_file)})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=url, api_key="unused")
    answers = [
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
            max_tokens=24,
        ).choices[0].message.content
        for model in ("french", "french-gguf")
    ]  # fmt: skip
    assert answers[0] == answers[1] and share(answers[1] or "", FRENCH_WORDS) > 0.25, answers
    httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "french-gguf"})
