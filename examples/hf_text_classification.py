"""Fine-tune a tiny BERT with Hugging Face's Trainer twice, plainly and with Selective Backprop.

    python examples/hf_text_classification.py            # under a minute on a 2-core CPU
    python examples/hf_text_classification.py --smoke    # a few seconds; what the test suite runs
    python examples/hf_text_classification.py --selective lossless

Nothing is downloaded: the "reviews" are generated sentences over a 40-word vocabulary, the
tokenizer is a word-level `tokenizers` model built from that vocabulary, and the model is a
one-layer `BertForSequenceClassification` built from a config. A review is positive when it
contains a praise word that is not negated ("not great" is negative). Both runs start from
the same weights.

The selective run is the same `Trainer` set-up with `SelectiveTrainer(..., selective=...)`:
by default the "fast" recipe (`sbdata.recipe("fast", plain_epochs)`: one plain warm-up epoch,
then a rank-weighted draw of 20 % of every batch favouring high losses, from losses the
training steps hand back, over plain training's epochs, the last tenth on all the data).
Every batch has the same length (`padding="max_length"`), which selection needs: kept rows
of several batches are re-packed into one.
"""

import argparse
import tempfile
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from sbdata.integrations.transformers import SelectiveTrainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--selective", default="fast", help="recipe name (fast, lossless, balanced) or a keep fraction")
parser.add_argument("--epochs", type=int, default=None, help="plain training epochs (default 4; 1 with --smoke)")
parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and order")
parser.add_argument("--output-dir", default=None, help="Trainer output directory (default: a temporary one)")
parser.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model is fastest on one)")
parser.add_argument("--smoke", action="store_true", help="tiny run for tests: 256 reviews, 1 epoch")
args = parser.parse_args()

hyp = {
    "train": 256 if args.smoke else 4096,
    "test": 256 if args.smoke else 1024,
    "epochs": args.epochs or (1 if args.smoke else 4),
    "batch_size": 32,
    "lr": 2e-3,  # AdamW, linear decay to 0 (Trainer's default schedule)
    "max_length": 16,  # tokens, [CLS] and [SEP] included
}
torch.set_num_threads(args.threads)
hf_logging.set_verbosity_error()

#####  Data: generated reviews and a word-level tokenizer  #####

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
PRAISE = ["great", "excellent", "loved"]
WORDS = [
    "the", "a", "movie", "film", "plot", "actors", "was", "were", "very", "quite", "long", "short", "and", "but",
    "music", "ending", "story", "scenes", "bad", "boring", "dull", "i", "it", "this", "seemed", "felt", "too",
    "slow", "funny", "odd", "some", "not",
]  # fmt: skip
VOCAB = {word: i for i, word in enumerate(SPECIAL + PRAISE + WORDS)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def make_reviews(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Positive (1) when a praise word appears without "not" right before it; 20 % of the
    reviews are the hard case, a negated praise ("not great"), which is negative."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)]
        kind = float(torch.rand(1, generator=g))  # < 0.4: praise, < 0.6: negated praise, else neither
        if kind < 0.6:
            at = int(torch.randint(1, length, (1,), generator=g))
            words[at] = PRAISE[int(torch.randint(len(PRAISE), (1,), generator=g))]
            words[at - 1] = "not" if kind >= 0.4 else ("the" if words[at - 1] == "not" else words[at - 1])
        texts.append(" ".join(words))
        labels.append(int(kind < 0.4))
    return texts, labels


class Reviews(Dataset):
    def __init__(self, texts, labels, tokenizer):
        self.encodings = tokenizer(texts, truncation=True, max_length=hyp["max_length"])
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.encodings["input_ids"][i], "labels": self.labels[i]}


tokenizer = make_tokenizer()
train_set = Reviews(*make_reviews(hyp["train"], seed=args.seed), tokenizer)
test_set = Reviews(*make_reviews(hyp["test"], seed=args.seed + 1000), tokenizer)
# one length for every batch: selection re-packs rows of several batches into one
collator = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=hyp["max_length"])
print(f"{len(train_set)} training and {len(test_set)} test reviews, e.g. {make_reviews(1, args.seed)[0][0]!r}")

#####  Model and training  #####


def make_model() -> BertForSequenceClassification:
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=hyp["max_length"], num_labels=2, pad_token_id=VOCAB["[PAD]"],
    )  # fmt: skip
    return BertForSequenceClassification(config)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def run(name: str, selective, output_dir: str) -> None:
    training_args = TrainingArguments(
        output_dir=f"{output_dir}/{name}", num_train_epochs=hyp["epochs"], per_device_train_batch_size=hyp["batch_size"],
        per_device_eval_batch_size=256, learning_rate=hyp["lr"], seed=args.seed, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    common = dict(
        model=make_model(), args=training_args, train_dataset=train_set, eval_dataset=test_set,
        data_collator=collator, compute_metrics=accuracy,
    )  # fmt: skip
    trainer = Trainer(**common) if selective is None else SelectiveTrainer(**common, selective=selective)
    trainer.remove_callback(PrinterCallback)  # the lines below say it all
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    if selective is None:
        examples = trainer.state.global_step * hyp["batch_size"]  # every batch is full here
        epochs = hyp["epochs"]
    else:
        history = trainer.selective_loader.stats.history
        examples, epochs = sum(s.yielded for s in history), len(history)
    print(
        f"{name:<10} test accuracy {100 * metrics['eval_accuracy']:6.2f} %   {seconds:5.1f} s   "
        f"{examples:6d} examples back-propagated over {epochs} epochs ({trainer.state.global_step} steps)"
    )


selective = float(args.selective) if args.selective.replace(".", "", 1).isdigit() else args.selective
if isinstance(selective, float):
    selective = dict(keep=selective, start=1 / (hyp["epochs"] + 1))  # one plain warm-up epoch
with tempfile.TemporaryDirectory() as scratch:
    out = args.output_dir or scratch
    run("plain", None, out)
    run("selective", selective, out)
