"""Generation: the key/value cache against full recomputation, batching, sampling, stopping, errors, CLI."""

import inspect
import os
import re

import numpy as np
import pytest
import torch

from gptfast import GPT, GPTConfig, generation, kernels
from gptfast.checkpoint import load_for_inference, save_checkpoint
from gptfast.cli import build_parser, main
from gptfast.cli_inference import print_as_it_arrives
from gptfast.generation import DEFAULT_TEMPERATURE, filter_logits, generate, pick_tokens, stream
from gptfast.tokenizer import TIKTOKEN_FILE_ENV, GPT2Tokenizer

VOCAB = 97


def make_model(context_length: int = 24, dtype: torch.dtype = torch.float64, seed: int = 0, n_layer: int = 2) -> GPT:
    """A tiny untied GPT whose large random weights give varied (not repetitive) greedy text."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=32, context_length=context_length,
                       tie_weights=False)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name.startswith(("transformer.wte", "transformer.wpe")) else 0.1)
    return model.to(dtype).eval()


def simple_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Re-run the model on the whole window each step, sliding as documented: when the sequence
    outgrows the context, drop the oldest quarter of the window."""
    context = model.config.context_length
    keep = max(1, context - max(1, context // 4))
    seq, start = list(prompt[-context:]), 0
    for _ in range(n):
        if len(seq) - start > context:
            start = len(seq) - keep
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt[-context:]):]


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The seeds' loop, written out: crop to the context, run the model, append the argmax."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits, _ = model(idx_cond)
        logits = logits[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_cached_logits_equal_full_forward():
    """Prefill then one token at a time through the cache gives the full forward's logits (float32)."""
    model = make_model(dtype=torch.float32)
    idx = torch.tensor(prompts_of([11, 11]))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2)
    chunks = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 11)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_masks_padding_and_counts_positions_from_first_token():
    model = make_model()
    short, long = prompts_of([4, 9])
    padded = torch.tensor([[0] * 5 + short, long])
    logits, _ = model(padded, left_pad=torch.tensor([5, 0]))
    alone, _ = model(torch.tensor([short]))
    torch.testing.assert_close(logits[0, 5:], alone[0], rtol=1e-12, atol=1e-12)
    # The same through the cache, in two chunks.
    cache = model.new_cache(batch_size=2)
    model(padded[:, :7], cache=cache, left_pad=torch.tensor([5, 0]))
    last, _ = model(padded[:, 7:], cache=cache, left_pad=torch.tensor([5, 0]))
    torch.testing.assert_close(last[0], alone[0, 2:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prompt_len, n", [(1, 10), (7, 17), (24, 5), (5, 60)])
def test_greedy_cache_no_cache_and_simple_loop_agree(prompt_len, n):
    """Token for token, inside the context and past it (the window slides), prompt filling it too."""
    model = make_model()
    prompt = prompts_of([prompt_len])[0]
    cached = generate(model, [prompt], n, temperature=0)[0]
    uncached = generate(model, [prompt], n, temperature=0, use_cache=False)[0]
    assert cached == uncached == simple_greedy(model, prompt, n)
    assert len(cached) == n and len(set(cached)) > 2  # the tiny model is not stuck repeating a token


def test_float32_cache_matches_no_cache():
    model = make_model(dtype=torch.float32)
    prompts = prompts_of([3, 8, 8, 1])
    assert generate(model, prompts, 30, temperature=0) == generate(model, prompts, 30, temperature=0,
                                                                   use_cache=False)


def test_batch_of_different_lengths_equals_each_prompt_alone():
    model = make_model()
    prompts = prompts_of([1, 6, 13, 6, 3])
    n = model.config.context_length - 13  # the longest prompt just fills the context
    batched = generate(model, prompts, n, temperature=0)
    assert batched == [simple_greedy(model, p, n) for p in prompts]
    assert batched == generate(model, prompts, n, temperature=0, use_cache=False)


def test_decoding_feeds_one_position_per_step(monkeypatch):
    """With the cache, each step after the prompt runs attention for one query over the filled prefix."""
    model = make_model()
    shapes = []
    real_attention = kernels.flash_attention

    def spy(q, k, v, *args, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real_attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, "flash_attention", spy)
    generate(model, prompts_of([5, 5]), 4, temperature=0)
    per_layer = shapes[:: model.config.n_layer]
    assert per_layer == [(5, 5), (1, 6), (1, 7), (1, 8)]


def test_eos_stops_each_prompt_and_ends_early():
    model = make_model()
    prompts = prompts_of([4, 6])
    free = generate(model, prompts, 8, temperature=0)
    eos = free[0][2]
    steps = []
    out = generate(model, prompts, 8, temperature=0, eos_token_id=eos, on_step=steps.append)
    assert out[0] == free[0][:3]  # the end-of-text token is included, then the prompt stops
    expected_1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert out[1] == expected_1
    assert len(steps) == max(len(out[0]), len(out[1]))
    assert all(step[0] is None for step in steps[3:])


def test_sampling_is_reproducible_with_a_seed():
    model = make_model()
    prompts = prompts_of([3, 5])
    a = generate(model, prompts, 12, temperature=1.0, seed=7)
    assert a == generate(model, prompts, 12, temperature=1.0, seed=7)
    assert a == generate(model, prompts, 12, temperature=1.0, seed=7, use_cache=False)
    assert a != generate(model, prompts, 12, temperature=1.0, seed=8)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model()
    prompts = prompts_of([3, 5])
    greedy = generate(model, prompts, 10, temperature=0)
    assert generate(model, prompts, 10, temperature=2.0, top_k=1, seed=0) == greedy
    assert generate(model, prompts, 10, temperature=2.0, top_p=1e-9, seed=0) == greedy


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept[0].tolist() == [False, True, False, True] and kept[1].sum() >= 2
    # 0.4 < 0.5, so the nucleus needs 0.3 too; 0.4 + 0.3 >= 0.6 stops there.
    assert filter_logits(logits, top_p=0.5)[0].isfinite().tolist() == [False, True, False, True]
    assert filter_logits(logits, top_p=0.7)[0].isfinite().tolist() == [False, True, False, True]
    assert filter_logits(logits, top_p=0.71)[0].isfinite().tolist() == [False, True, True, True]
    assert filter_logits(logits, top_k=3, top_p=1.0)[0].isfinite().tolist() == [False, True, True, True]


def test_sample_frequencies_follow_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 6).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.5):
        tokens = pick_tokens(logits, temperature, generator=generator)
        frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
        expected = (logits[0] / temperature).softmax(-1)
        assert (frequencies - expected).abs().max() < 0.015
    nucleus = filter_logits(logits[:1], top_p=0.8)[0].isfinite()
    tokens = pick_tokens(logits, 1.0, top_p=0.8, generator=generator)
    assert nucleus[tokens].all()


def test_long_prompt_is_cropped_with_a_warning():
    model = make_model(context_length=16)
    prompt = prompts_of([40])[0]
    with pytest.warns(UserWarning, match="longer than the context length 16"):
        out = generate(model, [prompt, prompt[:3]], 6, temperature=0)
    assert out[0] == generate(model, [prompt[-16:]], 6, temperature=0)[0]


def test_stream_yields_per_step_and_restores_training_mode():
    model = make_model().train()
    steps = list(stream(model, prompts_of([2, 3]), 5, temperature=0))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)
    assert model.training
    model.eval()
    assert generate(model, prompts_of([2]), 0) == [[]]


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[1, 2, 3]), "prompt 0 must be a list"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, VOCAB]]), f"token id {VOCAB}"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(eos_token_id=VOCAB), "eos_token_id"),
])
def test_bad_arguments(kwargs, words):
    arguments = dict(prompts=[[1, 2]], max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=words):
        generate(make_model(), **arguments)


def test_cache_errors():
    model = make_model()
    cache = model.new_cache(batch_size=2, max_len=6)
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 5 of 6 positions"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len 25"):
        model.new_cache(batch_size=1, max_len=25)
    with pytest.raises(ValueError, match="left_pad must have shape"):
        model(torch.zeros(2, 3, dtype=torch.long), left_pad=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="gptfast GPT"):
        generate(torch.nn.Linear(2, 2), [[1]], 2)


def test_triton_backend_decoding_matches_eager():
    """Decoding through the Triton kernels (interpreter on CPU) gives the eager path's tokens."""
    model = make_model(context_length=16, dtype=torch.float32)
    q = torch.zeros(1, 2, 1, 16)
    with kernels.use_backend("triton"):
        unsupported = [kernels.explain(*call).reason for call in [
            ("flash_attention", q, q, q), ("layer_norm", q, q[0, 0, 0], q[0, 0, 0]),
            ("bias_gelu", q, q[0, 0, 0])] if not kernels.explain(*call).use_triton]
    if unsupported:
        pytest.skip(f"Triton kernels not available: {unsupported}")
    prompts = prompts_of([6, 6])
    eager = generate(model, prompts, 6, temperature=0)
    with kernels.use_backend("triton"):
        assert generate(model, prompts, 6, temperature=0) == eager


class ByteTokenizer:
    """One token per byte; decoding replaces incomplete UTF-8 characters, as GPT-2's BPE does."""

    eot_token_id = None

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streaming_waits_for_whole_characters(capsys):
    on_step = print_as_it_arrives(ByteTokenizer(), eos=None)
    printed = []
    for token in "aé日".encode():
        on_step([token, 7])
        printed.append(capsys.readouterr().out)
    assert printed == ["a", "", "é", "", "", "日"]
    on_step([None, 7])  # the first prompt has stopped
    assert capsys.readouterr().out == ""


def test_cli_generate_from_training_checkpoint(tmp_path, capsys):
    chars = "\n abcdefgh"  # code-point order, as a saved char vocabulary is
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(chars), n_layer=1, n_head=2, n_embd=16, context_length=16)
    save_checkpoint(tmp_path, {"model_config": config.to_dict(), "model": GPT(config).state_dict(),
                               "tokenizer": {"kind": "char", "chars": chars}})
    main(["generate", "--checkpoint", str(tmp_path), "--prompt", "abc", "--prompt", "h", "-n", "5",
          "--seed", "3", "--device", "cpu"])
    out = capsys.readouterr()
    model, tokenizer = load_for_inference(tmp_path)
    new = generate(model, [tokenizer.encode("abc"), tokenizer.encode("h")], 5, temperature=DEFAULT_TEMPERATURE,
                   seed=3)
    assert out.out == "".join(f"--- prompt {i} ---\n{p}{tokenizer.decode(n)}\n"
                              for i, (p, n) in enumerate(zip(["abc", "h"], new)))
    assert "10 tokens in" in out.err and "with the key/value cache" in out.err


@pytest.mark.skipif(not os.environ.get(TIKTOKEN_FILE_ENV), reason="no local GPT-2 ranks file")
def test_cli_generate_streams_pretrained_gpt2(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, context_length=32)).save_pretrained(tmp_path)
    prompt = "Héllo, 日本"
    main(["generate", "--pretrained", str(tmp_path), "--prompt", prompt, "-n", "8", "--temperature", "0",
          "--no-cache", "--ignore-eos", "--device", "cpu"])
    tokenizer = GPT2Tokenizer()
    new = generate(GPT.from_pretrained(str(tmp_path)), [tokenizer.encode(prompt)], 8, temperature=0)[0]
    assert capsys.readouterr().out == prompt + tokenizer.decode(new) + "\n"


@pytest.mark.parametrize("prompt_len, n", [(1, 12), (9, 15), (24, 0)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_model_generate_is_the_seeds_loop_token_for_token(prompt_len, n, use_cache):
    """Tensor in, tensor out, prompt included: up to a full context, greedy equals the seeds' loop."""
    model = make_model()
    idx = torch.tensor(prompts_of([prompt_len, prompt_len]))
    expected = generate_text_simple(model, idx, n, model.config.context_length)
    out = model.generate(idx, n, temperature=0, use_cache=use_cache)
    assert torch.equal(out, expected) and out.dtype == idx.dtype
    assert torch.equal(generate(model, idx, n, temperature=0, use_cache=use_cache), expected)
    assert generate(model, idx.tolist(), n, temperature=0, use_cache=use_cache) == expected[:, prompt_len:].tolist()
    if n:
        assert len(set(out[0, prompt_len:].tolist())) > 2


def test_model_generate_samples_as_the_list_api_and_fills_stopped_rows_with_eos():
    model = make_model()
    idx = torch.tensor(prompts_of([5, 5, 5]))  # batch 3 again: the same compiled step
    new = generate(model, idx.tolist(), 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    out = model.generate(idx, 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert out[:, 5:].tolist() == new
    free = model.generate(idx, 8, temperature=0)[:, 5:].tolist()
    eos = free[0][2]  # the first row stops by its third new token
    cut = [row[:row.index(eos) + 1] if eos in row else row for row in free]
    width = max(len(row) for row in cut)
    expected = [prompt + row + [eos] * (width - len(row)) for prompt, row in zip(idx.tolist(), cut)]
    assert len(cut[0]) <= 3 and model.generate(idx, 8, temperature=0, eos_token_id=eos).tolist() == expected


def test_model_generate_is_the_generation_function():
    assert GPT.generate is generation.model_generate
    with pytest.raises(TypeError, match=r"GPT.generate takes a \(batch, seq\) tensor"):
        make_model().generate([[1, 2]], 3)


@pytest.mark.parametrize("idx, words", [
    (torch.tensor([1, 2, 3]), r"2-D \(batch, seq\).*got shape \(3,\)"),
    (torch.zeros(2, 0, dtype=torch.long), r"got shape \(2, 0\)"),
    (torch.ones(1, 3), "integer token ids, got dtype torch.float32"),
    (torch.tensor([[1, VOCAB]]), f"token id {VOCAB}"),
])
def test_bad_prompt_tensors(idx, words):
    with pytest.raises(ValueError, match=words):
        generate(make_model(), idx, 3)


def test_context_length_1_generates_past_its_first_token():
    model = make_model(context_length=1)
    idx = torch.tensor(prompts_of([3]))
    expected = generate_text_simple(model, idx, 6, context_size=1)
    for use_cache in (True, False):
        with pytest.warns(UserWarning, match="longer than the context length 1"):
            assert torch.equal(model.generate(idx, 6, temperature=0, use_cache=use_cache), expected)
    assert torch.equal(model.generate(idx[:, -1:], 6, temperature=0)[:, 1:], expected[:, 3:])


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_temperatures_that_overflow_softmax_are_greedy(temperature):
    model = make_model(dtype=torch.float32)
    prompts = prompts_of([3, 6])
    assert generate(model, prompts, 10, temperature=temperature, seed=0) == generate(model, prompts, 10, temperature=0)
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.999]])
    assert pick_tokens(logits, temperature).tolist() == [1, 0]


def test_numpy_integer_ids_are_accepted():
    model = make_model()
    prompts = prompts_of([4, 7])
    expected = generate(model, prompts, 6, temperature=0, eos_token_id=5)
    as_numpy = [np.array(prompts[0], dtype=np.int32), [np.int64(t) for t in prompts[1]]]
    assert generate(model, as_numpy, np.int64(6), temperature=0, eos_token_id=np.int64(5)) == expected
    assert generate(model, prompts, 6, temperature=2.0, top_k=np.int64(1), seed=0) == \
        generate(model, prompts, 6, temperature=0)
    with pytest.raises(ValueError, match="prompt 0 must be a list of int token ids"):
        generate(model, [np.array([1.0, 2.0])], 3)


def test_one_default_temperature_for_the_api_and_the_cli():
    def default(function):
        return inspect.signature(function).parameters["temperature"].default

    assert default(generate) == default(stream) == default(GPT.generate) == default(pick_tokens) == DEFAULT_TEMPERATURE
    args = build_parser().parse_args(["generate", "--checkpoint", "x"])
    assert args.temperature == DEFAULT_TEMPERATURE


def test_cli_generate_checks_arguments_before_printing(tmp_path, capsys):
    chars = "\nabc"  # code-point order, as a saved char vocabulary is
    config = GPTConfig(vocab_size=len(chars), n_layer=1, n_head=1, n_embd=8, context_length=8)
    save_checkpoint(tmp_path, {"model_config": config.to_dict(), "model": GPT(config).state_dict(),
                               "tokenizer": {"kind": "char", "chars": chars}})
    code = main(["generate", "--checkpoint", str(tmp_path), "--prompt", "abc", "--top-k", "0", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert out.err.strip() == "gptfast generate: error: top_k must be a positive integer, got 0"


# Compiled decoding: one static-shape step, compiled once per batch size, replayed for every token. The models
# have one layer: a layer more is more to compile (seconds a test), not another path.

def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def counting_compiled_steps(monkeypatch) -> list[int]:
    """Counts the calls of the compiled decode step (one entry per call, its batch size)."""
    calls, compiled = [], generation.compiled_decode_step

    def counted(device):
        step = compiled(device)

        def run(model, token, *args, **kwargs):
            calls.append(token.shape[0])
            return step(model, token, *args, **kwargs)
        return run

    monkeypatch.setattr(generation, "compiled_decode_step", counted)
    return calls


@pytest.fixture(scope="module")
def long_compiled_run():
    """257 greedy tokens of 3 prompts through the compiled step, compiled afresh (no graph or code of an
    earlier test): the step's calls, the graphs compiled, the tokens, the code inductor generated and the
    model. One compilation for the two tests below."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    torch._dynamo.reset()  # the recompilation limit counts every earlier test's graphs too
    model = make_model(context_length=264, dtype=torch.float32, n_layer=1)
    prompts = prompts_of([4] * 3)
    with pytest.MonkeyPatch.context() as monkeypatch, fresh_cache():
        calls = counting_compiled_steps(monkeypatch)
        before = unique_graphs()
        tokens, code = run_and_get_code(generate, model, prompts, 257, temperature=0, compile=True)
        graphs = unique_graphs() - before
    return dict(calls=calls, graphs=graphs, tokens=tokens, code=code, model=model, prompts=prompts)


def test_256_compiled_decode_steps_compile_once_and_equal_eager(long_compiled_run):
    run = long_compiled_run
    assert run["calls"] == [3] * 256  # the prefill's token, then 256 replays of the step
    assert run["graphs"] == 1
    assert run["tokens"] == generate(run["model"], run["prompts"], 257, temperature=0)


def test_compiled_decode_step_updates_the_cache_in_place(long_compiled_run):
    """The compiled step writes each new key and value into the cache, not into a copy of it: no
    generated kernel runs over a whole layer's keys (cache tensors that were views of one tensor cost
    a copy of every layer's keys and values per token: 4.5x slower at batch 16 on a CPU; the copy then
    runs over the whole base, a multiple of a layer's keys)."""
    model, code = long_compiled_run["model"], long_compiled_run["code"]
    layer_keys = 3 * model.config.n_head * model.config.context_length * model.config.head_dim  # 25344 elements
    sizes = {int(n) for c in code for n in re.findall(r"\b\d{5,}\b", c)}  # the kernels' element counts among them
    assert code and not [n for n in sizes if n % layer_keys == 0]  # one layer's keys, or all layers' (one base)


def test_compiled_greedy_equals_eager_and_the_seeds_loop(monkeypatch):
    model = make_model(n_layer=1)
    calls = counting_compiled_steps(monkeypatch)
    prompts = prompts_of([1, 6, 9])
    n = model.config.context_length - 9
    assert generate(model, prompts, n, temperature=0, compile=True) == generate(model, prompts, n, temperature=0)
    assert calls == [3] * (n - 1)
    idx = torch.tensor(prompts_of([5, 5, 5]))  # batch 3 again: the same compiled step
    expected = generate_text_simple(model, idx, 12, model.config.context_length)
    assert torch.equal(model.generate(idx, 12, temperature=0, compile=True), expected)


def test_compiled_prefill_of_a_long_prompt_runs_on_the_triton_backend():
    """The prefill of a static cache goes through the attention kernels as a plain cache does, so a
    prompt of more queries than the decode path takes (16) works on the "triton" backend."""
    model = make_model(context_length=32, dtype=torch.float32, n_layer=1)
    prompt = prompts_of([20])[0]
    with kernels.use_backend("triton"):
        compiled = generate(model, [prompt], 3, temperature=0, compile=True)[0]
    assert compiled == generate(model, [prompt], 3, temperature=0)[0]


def test_compiled_window_slides_past_the_context(monkeypatch):
    """Past the context the cache is reset and refilled eagerly; decoding then replays the step again.
    (Three prompts of one token: the step the greedy test above compiled for model.generate, replayed.)"""
    model = make_model(n_layer=1)
    calls = counting_compiled_steps(monkeypatch)
    prompts = prompts_of([1, 1, 1])
    before = unique_graphs()
    out = generate(model, prompts, 40, temperature=0, compile=True)
    assert out == [simple_greedy(model, prompt, 40) for prompt in prompts]
    # Eager prefills: the prompt's, then one per slide: the window of 24 keeps 18 at 25, so every 7 steps from step 24.
    slides = len(range(24, 40, 7))
    assert calls == [3] * (40 - 1 - slides)
    assert unique_graphs() - before <= 2  # one graph, and at most one recompile for the slide


def test_compiled_sampling_is_reproducible_and_stops_at_eos():
    model = make_model(n_layer=1)
    prompts = prompts_of([3, 5])
    options = dict(temperature=1.0, top_k=20, top_p=0.95, compile=True)
    a = generate(model, prompts, 12, seed=7, **options)
    assert a == generate(model, prompts, 12, seed=7, **options) != generate(model, prompts, 12, seed=8, **options)
    eos = a[0][2]
    stopped = generate(model, prompts, 12, seed=7, eos_token_id=eos, **options)
    assert stopped[0] == a[0][:a[0].index(eos) + 1]
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(model, prompts, 3, compile=True, use_cache=False)


def test_race_tokens_follow_the_tempered_filtered_softmax():
    """The compiled step's sampler: argmax(probs / Exponential(1) noise) draws from probs."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in ((0.5, None), (1.5, None), (1.0, 0.8)):
        noise = generation._noise(len(logits), 6, temperature, logits.device, generator)
        tokens = generation.race_tokens(logits, temperature, None, top_p, noise)
        frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
        expected = generation._probabilities(logits[:1], temperature, None, top_p)[0].float()
        assert (frequencies - expected).abs().max() < 0.015
    assert torch.equal(generation.race_tokens(logits, 0, None, None, None), logits.argmax(-1))


def test_static_cache_logits_equal_full_forward():
    """The static cache (length a tensor, writes by index, attention over every slot) gives the full forward's."""
    model = make_model(dtype=torch.float32)
    idx = torch.tensor(prompts_of([11, 11]))
    left_pad = torch.tensor([3, 0])
    full, _ = model(idx, left_pad=left_pad)
    cache = model.new_cache(batch_size=2, static=True)
    chunks = [model(idx[:, :5], cache=cache, left_pad=left_pad)[0]]
    chunks += [model(idx[:, t:t + 1], cache=cache, left_pad=left_pad)[0] for t in range(5, 11)]
    assert int(cache.length) == 11 and cache.max_len == model.config.context_length
    torch.testing.assert_close(torch.cat(chunks, dim=1)[1], full[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(chunks, dim=1)[0, 3:], full[0, 3:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds 11 of 24 positions: no room for 14 more"):
        model(idx[:, :1].repeat(1, 14), cache=cache)
    cache.reset()
    assert int(cache.length) == 0


def test_cli_generate_compile_flag(monkeypatch, tmp_path):
    assert build_parser().parse_args(["generate", "--checkpoint", "x", "--compile"]).compile
    seen = {}
    monkeypatch.setattr("gptfast.cli_inference.stream", lambda *args, **kwargs: seen.update(kwargs) or iter(()))
    chars = "abc"
    config = GPTConfig(vocab_size=len(chars), n_layer=1, n_head=2, n_embd=16, context_length=16)
    save_checkpoint(tmp_path, {"model_config": config.to_dict(), "model": GPT(config).state_dict(),
                               "tokenizer": {"kind": "char", "chars": chars}})
    main(["generate", "--checkpoint", str(tmp_path), "--prompt", "ab", "--compile", "--device", "cpu"])
    assert seen["compile"] is True


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.0, seed=0), dict(use_cache=False)])
def test_nan_weights_stop_generation_with_the_step_and_the_tensor(options):
    """torch.multinomial failed on the NaN probabilities, and greedy decoding returned tokens of NaN logits."""
    model = make_model()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    words = (r"^the logits are NaN or inf at step 1 of generation \(prompt 0\): the model's weights hold NaN or inf "
             r"\(transformer.h.1.mlp.c_fc.weight\)$")
    with pytest.raises(FloatingPointError, match=words):
        generate(model, [[1, 2], [3]], 4, **options)


def test_the_compiled_step_marks_rows_whose_logits_are_not_finite():
    """The decode step (here eager: the same code that compiles) returns -1 for such a row, read back with
    its tokens: no host sync of its own."""
    model = make_model(dtype=torch.float32)
    cache = model.new_cache(2)
    with torch.no_grad():
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache)
        model.lm_head.weight[5, 0] = float("inf")
        token = torch.tensor([1, 2])
        noise = torch.ones(2, VOCAB, dtype=torch.float64)
        new = generation._decode_step(model, token, cache, None, noise, 1.0, None, None)
    assert new.tolist() == [generation.NONFINITE] * 2


def test_uint8_prompt_tensors_give_int64_where_uint8_cannot_hold_the_vocabulary():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, context_length=16))
    prompt = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    out = model.generate(prompt, 4, temperature=0)
    assert out.dtype == torch.int64 and out.tolist() == model.generate(prompt.long(), 4, temperature=0).tolist()
    assert model.generate(prompt.int(), 4, temperature=0).dtype == torch.int32  # holds every id: kept
    assert make_model().generate(prompt, 4, temperature=0).dtype == torch.uint8  # 97 ids: kept
