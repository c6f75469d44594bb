"""The toy suite: deterministic tasks with correct answers, disjoint splits, tokenizer, evaluation (no training)."""

from __future__ import annotations

import random
import string

import pytest
import torch

from sens_peft.testing import toy


@pytest.fixture(scope="module")
def tok():
    return toy.build_tokenizer()


# Independent reference answers, written without the task module's helpers (tables rebuilt from their seeds).
def _reference(task: str, x: str) -> str:
    if task == "inc":
        return "".join("1234567890"["0123456789".index(c)] for c in x)
    if task == "cipher":
        table = random.Random(1234).sample("abcdefgh", 8)
        return "".join(table[ord(c) - ord("a")] for c in x)
    if task == "rcipher":
        table = random.Random(4321).sample("abcdefgh", 8)
        rotated = [x[(i + 1) % len(x)] for i in range(len(x))]
        return "".join(table[ord(c) - ord("a")] for c in rotated)
    if task == "d2l":
        table = random.Random(2024).sample("ijklmnopqrst", 10)
        return "".join(table[int(c)] for c in x)
    raise AssertionError(task)


@pytest.mark.parametrize("task", toy.TASK_NAMES)
def test_answers_are_correct(task):
    splits = toy.task_splits(task)
    for split, pairs in splits.items():
        assert len(pairs) == toy.SPLIT_SIZES[split]
        for x, y in pairs:
            assert y == _reference(task, x), (task, split, x, y)
            assert toy.TASKS[task].solve(x) == y


@pytest.mark.parametrize("task", toy.TASK_NAMES)
def test_splits_deterministic_and_disjoint(task):
    a = toy.task_splits(task)
    toy._SPLIT_CACHE.clear()  # regenerate from the seed rather than reading the memo
    b = toy.task_splits(task)
    assert a == b
    inputs = {split: {x for x, _ in pairs} for split, pairs in a.items()}
    assert all(len(inputs[s]) == len(a[s]) for s in a)  # no duplicates inside a split
    assert not inputs["train"] & inputs["test"]
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["validation"] & inputs["test"]
    other_seed = toy.task_splits(task, seed=1)
    assert other_seed["test"] != a["test"]


def test_task_examples_look_right():
    letters = set(string.ascii_lowercase)
    for task in toy.TASK_NAMES:
        pairs = toy.task_splits(task)["test"]
        alphabet = set(toy.TASK_ALPHABETS[task])
        assert all(len(x) == len(y) == toy.STR_LEN and set(x) <= alphabet for x, y in pairs)
        assert set(x for p in pairs for x in p[0]) == alphabet  # the test split uses the full alphabet
        assert all(set(y) <= (set(string.digits) if task == "inc" else letters) for _, y in pairs)
    assert toy.MAX_ANSWER_TOKENS >= max(len(y) for t in toy.TASK_NAMES for _, y in toy.task_splits(t)["test"]) + 1
    # the maps are bijections (so each unknown input symbol has its own, unseen output)
    assert sorted(toy.CIPHER.values()) == sorted(toy.CIPHER) and sorted(toy.RCIPHER.values()) == sorted(toy.RCIPHER)
    assert len(set(toy.D2L.values())) == 10


def test_known_symbols_and_restricted_train():
    settings = toy.ToySettings()
    seen = set()
    for task in toy.TASK_NAMES:
        alphabet = toy.TASK_ALPHABETS[task]
        k = settings.known[task]
        known = toy.known_symbols(task, k)
        assert len(known) == k < len(alphabet) and set(known) < set(alphabet)
        assert known == toy.known_symbols(task, k)  # deterministic
        assert toy.known_symbols(task, len(alphabet)) == "".join(sorted(alphabet))
        seen.add((alphabet, known))
        rows = toy.restricted_train(task, k)
        train = toy.task_splits(task)["train"]
        unknown = set(alphabet) - set(known)
        assert rows and all(not set(x) & unknown for x, _ in rows)  # unknown symbols really excluded
        expected = sum(all(c in known for c in x) for x, _ in train)
        assert len(rows) == expected and set(rows) <= set(train)
        # roughly (k / |alphabet|)^4 of uniformly drawn inputs are fully known
        assert abs(len(rows) / len(train) - (k / len(alphabet)) ** toy.STR_LEN) < 0.05
    assert len({known for _, known in seen}) == len(toy.TASK_NAMES)  # tasks miss different symbols
    with pytest.raises(ValueError):
        toy.known_symbols("inc", 11)


def test_tokenizer_round_trip(tok):
    vocab = toy.vocabulary()
    assert len(tok) == len(vocab) and len(set(vocab)) == len(vocab)
    assert tok.convert_tokens_to_ids(vocab) == list(range(len(vocab)))
    text = "<map>hello world 123+45=,.:|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<map>", "h"]
    assert len(ids) == len(text) - len("<map>") + 1  # one token per character, one for the tag
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text[len("<map>"):]
    assert tok.unk_token_id not in ids
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"


def test_encode_example_masks_prompt(tok):
    ex = toy.encode_example(tok, "inc", "1234", "2345")
    n_prompt = 1 + 1 + 4 + 1  # bos, tag, "1234", "="
    assert ex["input_ids"][0] == tok.bos_token_id
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == "2345" and ex["input_ids"][-1] == tok.eos_token_id


def test_sft_rows_match_examples(tok):
    rows = toy.sft_rows("cipher", "train", tok, n=3)
    for row, (x, y) in zip(rows, toy.task_splits("cipher")["train"]):
        ex = toy.encode_example(tok, "cipher", x, y)
        assert row["input_ids"] == ex["input_ids"]
        assert row["completion_mask"] == [int(v != -100) for v in ex["labels"]] and sum(row["completion_mask"]) == 5


def test_collator_pads_right(tok):
    rows = [toy.encode_example(tok, "cipher", "abc", "cba"), toy.encode_example(tok, "inc", "1234", "2345")]
    batch = toy.ToyCollator(tok.pad_token_id)(rows)
    n0 = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, len(rows[1]["input_ids"])))
    assert batch["attention_mask"][0].sum() == n0
    assert (batch["labels"][0, n0:] == -100).all() and (batch["input_ids"][0, n0:] == tok.pad_token_id).all()


class _Oracle(torch.nn.Module):
    """A generate() stub: appends the correct (or a corrupted) answer + EOS after each left-padded prompt."""

    def __init__(self, tok, wrong: bool = False):
        super().__init__()
        self.tok, self.wrong, self.calls = tok, wrong, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls += 1
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left padded"
        outs = []
        for row, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(row[mask.bool()].tolist(), skip_special_tokens=False)
            tag_end = text.index(">", len(toy.BOS)) + 1
            tag, x = text[len(toy.BOS) : tag_end], text[tag_end:-1]
            task = next(t for t in toy.TASKS.values() if t.tag == tag)
            y = task.solve(x)
            if self.wrong:
                y = y + "0"
            new = self.tok.encode(y, add_special_tokens=False) + [self.tok.eos_token_id]
            new = (new + [self.tok.pad_token_id] * max_new_tokens)[:max_new_tokens]
            outs.append(torch.cat([row, torch.tensor(new)]))
        return torch.stack(outs)


def test_evaluate_oracle_and_wrong(tok):
    oracle = _Oracle(tok)
    res = toy.evaluate(oracle, n=40, batch_size=16, tokenizer=tok)
    assert res == {t: 1.0 for t in toy.TASK_NAMES}
    assert oracle.calls == len(toy.TASK_NAMES) * 3  # 40 prompts in batches of 16
    res = toy.evaluate(_Oracle(tok, wrong=True), ["inc", "rcipher"], split="validation", n=20, tokenizer=tok)
    assert res == {"inc": 0.0, "rcipher": 0.0}


def test_decode_answer_stops_at_eos(tok):
    ids = tok.encode("46", add_special_tokens=False) + [tok.eos_token_id] + tok.encode("9", add_special_tokens=False)
    assert toy.decode_answer(tok, ids) == "46"
    assert toy.decode_answer(tok, [tok.eos_token_id]) == ""


def test_evaluate_real_model_matches_unbatched(tok):
    # An untrained tiny Llama: batched left-padded greedy decoding must equal one-prompt-at-a-time decoding.
    model = toy.build_model(toy.ToySettings(num_hidden_layers=2, hidden_size=32, intermediate_size=64), tok)
    inputs = [x for x, _ in toy.task_splits("rcipher")["test"][:6]]
    batched = toy.predict(model, "rcipher", inputs, tokenizer=tok, batch_size=6)
    single = [toy.predict(model, "rcipher", [x], tokenizer=tok)[0] for x in inputs]
    assert batched == single
    res = toy.evaluate(model, ["rcipher"], n=6, tokenizer=tok, loglik=True)
    assert 0.0 <= res["rcipher"] <= 1.0 and res["rcipher/loglik"] < 0


def test_normalized_accuracy():
    out = toy.normalized_accuracy({"a": 0.45, "b": 0.2, "c": 0.9}, {"a": 0.9, "b": 0.8})
    assert out["a"] == pytest.approx(0.5) and out["b"] == pytest.approx(0.25)
    assert out["avg"] == pytest.approx(0.375) and "c" not in out
    with pytest.raises(KeyError):
        toy.normalized_accuracy({"a": 1.0}, {"b": 1.0})


def test_settings_hash_and_cache_path(tmp_path):
    a, b = toy.ToySettings(), toy.ToySettings(steps=7)
    assert a.digest() == toy.ToySettings().digest() != b.digest()
    assert toy.base_path(a, tmp_path) == tmp_path / a.digest()


def test_pretraining_rows_share(tok):
    settings = toy.ToySettings(task_share=0.5)
    rows = toy.pretraining_rows(tok, settings, 400)
    assert rows == toy.pretraining_rows(tok, settings, 400)
    tags = {tok.convert_tokens_to_ids(t.tag) for t in toy.TASKS.values()}
    assert all(r[0] == tok.bos_token_id and r[-1] == tok.eos_token_id for r in rows)
    share = sum(r[1] in tags for r in rows) / len(rows)
    assert 0.4 < share < 0.6
    texts = {tok.decode(r[1:], skip_special_tokens=False).split("=")[0] + "=" for r in rows}
    for task in toy.TASK_NAMES:
        test_inputs = {toy.TASKS[task].prompt(x) for x, _ in toy.task_splits(task)["test"]}
        assert not texts & test_inputs  # pre-training never sees test examples
        known = set(toy.known_symbols(task, settings.known[task]))
        tagged = [t[len(toy.TASKS[task].tag):-1] for t in texts if t.startswith(toy.TASKS[task].tag)]
        assert len(tagged) > 10 and all(set(x) <= known for x in tagged)  # ... nor any unknown input symbol
