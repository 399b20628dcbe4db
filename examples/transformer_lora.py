"""Which fine-tuning sentences taught a LoRA-tuned GPT-2 to write this?
=====================================================================

A language-model story on a corpus this script builds (nothing is downloaded):

1. a word-level vocabulary and sentences from a small grammar with four topics
   (kitchen, space, football, sea), each topic with its own people, verbs,
   things, places and adjectives;
2. a tiny GPT-2 from a ``GPT2Config`` (random init) is *pretrained* on short
   sentences ("the chef bakes the bread .", "the comet is bright ."): it
   learns the words and which of them go together;
3. it is fine-tuned with peft LoRA (the adapters only) on longer sentences of
   five new templates ("every striker blocks the header and the ball ."),
   every sentence about one topic, and a few of them are held out;
4. attribkit attributes each held-out sentence, and sentences the fine-tuned
   model generates, to the fine-tuning sentences: ``ak.EKFACIFVP`` fitted on
   the raw peft model (its default layers are exactly the LoRA modules), the
   per-example gradients of the LoRA parameters from
   ``ak.per_example_gradients``, and ``ak.influence(..., top_k=5)``;
5. it prints the top proponents as text and how many of them share the test
   sentence's topic (chance: one in four), for EK-FAC and for the plain
   gradient dot product.

The batches are Hugging Face dict batches (``input_ids``, ``attention_mask``,
right padding) and the loss is ``loss="causal_lm"``: exactly what the model
was fine-tuned on.

Run: ``python examples/transformer_lora.py`` (about 45 s on 2 CPU cores;
``--quick``: a smaller corpus and fewer steps, about 20 s). Needs
``transformers`` and ``peft`` (the ``examples`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import attribkit as ak

# Library chatter that says nothing about this story: transformers 5 logs the loss it
# picks for a model built from a config, and peft 0.21 reads an attribute that
# transformers 5 deprecates.
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)

TOPICS = {
    "kitchen": {
        "who": ["chef", "cook", "baker", "waiter", "grandmother"],
        "does": ["chops", "stirs", "bakes", "tastes", "serves", "roasts"],
        "what": ["onion", "garlic", "bread", "soup", "pepper", "butter", "cake"],
        "where": ["oven", "pan", "kitchen", "pot", "bowl"],
        "how": ["hot", "fresh", "salty", "sweet", "crisp"],
    },
    "space": {
        "who": ["astronaut", "telescope", "probe", "rover", "pilot"],
        "does": ["orbits", "observes", "photographs", "scans", "tracks", "measures"],
        "what": ["comet", "planet", "nebula", "moon", "star", "asteroid", "galaxy"],
        "where": ["orbit", "crater", "void", "station", "sky"],
        "how": ["distant", "bright", "frozen", "dark", "huge"],
    },
    "football": {
        "who": ["striker", "keeper", "coach", "referee", "winger"],
        "does": ["kicks", "passes", "blocks", "heads", "shoots", "tackles"],
        "what": ["ball", "corner", "penalty", "cross", "shot", "header", "pass"],
        "where": ["goal", "pitch", "stadium", "box", "net"],
        "how": ["late", "quick", "long", "clever", "wild"],
    },
    "sea": {
        "who": ["sailor", "captain", "fisherman", "diver", "pirate"],
        "does": ["rows", "anchors", "steers", "hauls", "ties", "repairs"],
        "what": ["boat", "rope", "sail", "anchor", "buoy", "mast", "raft"],
        "where": ["harbour", "bay", "reef", "deck", "waves"],
        "how": ["wet", "heavy", "rough", "calm", "old"],
    },
}
PRETRAIN_TEMPLATES = [
    "the {who} {does} the {what} .",
    "the {what} is {how} .",
    "the {who} works in the {where} .",
    "a {how} {what} is in the {where} .",
]
TEMPLATES = [
    "the {who} {does} the {how} {what} in the {where} .",
    "a {who} {does} a {what} near the {where} .",
    "the {how} {who} {does} the {what} .",
    "every {who} {does} the {what} and the {what} .",
    "in the {where} the {who} {does} a {how} {what} .",
]
SPECIAL = ["<pad>", "<s>"]  # <pad> = 0 pads on the right; <s> starts every sentence
SIZES = {  # sentences per topic, held out per topic, pretraining and LoRA steps
    "full": dict(train=60, held_out=8, pretrain_steps=1500, lora_steps=600),
    "quick": dict(train=30, held_out=4, pretrain_steps=400, lora_steps=250),
}


# --------------------------------------------------------------------------- corpus
def sentence(rng, templates, topic):
    words = []
    for part in rng.choice(templates).split():
        words.append(rng.choice(TOPICS[topic][part[1:-1]]) if part.startswith("{") else part)
    return " ".join(words)


def build_corpus(train_per_topic, held_out_per_topic, seed=0):
    """Short pretraining sentences; fine-tuning and held-out sentences of the long templates."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    pretrain = [sentence(rng, PRETRAIN_TEMPLATES, rng.choice(topics)) for _ in range(2000)]
    train, held_out = [], []
    for topic in topics:
        seen = set()
        while len(seen) < train_per_topic + held_out_per_topic:
            seen.add(sentence(rng, TEMPLATES, topic))
        texts = sorted(seen)
        rng.shuffle(texts)
        train += [(t, topic) for t in texts[:train_per_topic]]
        held_out += [(t, topic) for t in texts[train_per_topic:]]
    rng.shuffle(train)
    return pretrain, train, held_out


def build_vocabulary():
    templates = PRETRAIN_TEMPLATES + TEMPLATES
    words = {w for t in templates for w in t.split() if not w.startswith("{")}
    words |= {w for slots in TOPICS.values() for ws in slots.values() for w in ws}
    return {w: i for i, w in enumerate(SPECIAL + sorted(words))}


def encode(texts, vocab):
    """Right-padded ``input_ids`` (``<s>`` first) and ``attention_mask``: a collator's batch."""
    rows = [[vocab["<s>"]] + [vocab[w] for w in t.split()] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(texts, vocab, size):
    return [encode(texts[i : i + size], vocab) for i in range(0, len(texts), size)]


# --------------------------------------------------------------------------- training
def train(model, texts, vocab, steps, lr, seed):
    """Adam on the mean next-token loss (Hugging Face's ``labels``: ``-100`` at padding)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(texts), (32,), generator=g).tolist()
        batch = encode([texts[i] for i in pick], vocab)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def mean_loss(model, texts, vocab):
    """Mean next-token cross entropy per predicted word."""
    batch = encode(texts, vocab)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def generate(model, prompt, vocab, words, max_len=12):
    """Greedy continuation of ``prompt`` up to the full stop."""
    ids = [vocab["<s>"]] + [vocab[w] for w in prompt.split()]
    with torch.no_grad():
        while len(ids) < max_len and words[ids[-1]] != ".":
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits[: len(SPECIAL)] = -float("inf")
            ids.append(int(logits.argmax()))
    return " ".join(words[i] for i in ids[1:])


# --------------------------------------------------------------------------- story
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpus, fewer steps")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    torch.set_num_threads(2)
    start = time.perf_counter()

    # 1. corpus and vocabulary
    pretrain_texts, train_set, held_out = build_corpus(size["train"], size["held_out"])
    vocab = build_vocabulary()
    words = {i: w for w, i in vocab.items()}
    train_texts = [t for t, _ in train_set]
    print(
        f"corpus: {len(vocab)} words; {len(pretrain_texts)} short pretraining sentences, "
        f"{len(train_texts)} fine-tuning sentences and {len(held_out)} held out "
        f"({', '.join(TOPICS)})"
    )

    # 2. a tiny GPT-2 from a config, pretrained on the short sentences
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=16, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["<s>"], pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    base = GPT2LMHeadModel(config)
    train(base, pretrain_texts, vocab, size["pretrain_steps"], lr=3e-3, seed=1)
    topical = [t for t, _ in held_out]
    before = mean_loss(base, topical, vocab)

    # 3. LoRA on the attention and MLP projections (GPT-2's Conv1D: fan_in_fan_out)
    lora = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
            target_modules=["c_attn", "c_proj", "c_fc"],
        ),
    )  # fmt: skip
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lora.parameters())
    train(lora, train_texts, vocab, size["lora_steps"], lr=1e-2, seed=2)
    after = mean_loss(lora, topical, vocab)
    print(
        f"LoRA fine-tune: {trainable:,} of {total:,} parameters trainable; held-out loss per "
        f"word {before:.2f} before, {after:.2f} after ({time.perf_counter() - start:.0f} s)"
    )

    # 4. attribution: EK-FAC on the LoRA layers, gradients of the LoRA parameters
    train_batches = batches(train_texts, vocab, 32)
    torch.manual_seed(0)  # fisher="true" samples the next words from the model
    ekfac = ak.EKFACIFVP(damping="auto", fisher="true", loss="causal_lm")
    ekfac.fit(lora, train_batches)
    print(
        f"EK-FAC on {len(ekfac.layers_)} LoRA layers "
        f"({ekfac.layers_[0].replace('base_model.model.', '')}, ...)"
    )
    params = list(ekfac.param_shapes_)  # the LoRA parameters
    G_train = ak.per_example_gradients(lora, train_batches, loss="causal_lm", params=params)
    G_test = ak.per_example_gradients(
        lora, batches(topical, vocab, 32), loss="causal_lm", params=params
    )
    k = 5
    scores, top_idx, _, _ = ak.influence(ekfac, G_train, G_test, top_k=k)

    def show(text, topic, idx, vals):
        print(f'\n"{text}"' + (f"  [{topic}]" if topic else ""))
        for i, s in zip(idx[:3].tolist(), vals[:3].tolist()):
            print(f'   {s:+9.1f}  [{train_set[i][1]:>8}]  "{train_set[i][0]}"')

    print("\nHeld-out sentences and their top 3 proponents among the fine-tuning sentences:")
    for topic in TOPICS:
        t = next(i for i, (_, tt) in enumerate(held_out) if tt == topic)
        show(held_out[t][0], topic, top_idx[t], scores[t])

    # A sentence the fine-tuned model writes, attributed the same way.
    for prompt in ("the captain", "a striker"):
        text = generate(lora, prompt, vocab, words)
        G_gen = ak.per_example_gradients(
            lora, encode([text], vocab), loss="causal_lm", params=params
        )
        s, idx, _, _ = ak.influence(ekfac, G_train, G_gen, top_k=k)
        show(f"{text}", "generated", idx[0], s[0])

    # 5. how often the top proponents share the test sentence's topic
    def share(idx):
        same = [
            train_set[i][1] == held_out[t][1] for t, row in enumerate(idx) for i in row.tolist()
        ]
        return sum(same) / len(same)

    dot_idx = (G_test @ G_train.T).topk(k, dim=1).indices
    print(f"\nTop-{k} proponents of the {len(held_out)} held-out sentences in the same topic:")
    print(f"  EK-FAC influence        {share(top_idx):.0%}")
    print(f"  gradient dot product    {share(dot_idx):.0%}")
    print(f"  chance                  {1 / len(TOPICS):.0%}")
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
