"""ProCIR dialogue formats, token by token."""

import numpy as np
import pytest

from procir_jax.data import dialogue
from procir_jax.data import tokenizer as tok

PAD = tok.IMAGE_PAD
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
  return tok.load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def dialogues(tokenizer):
  return dialogue.Dialogues(tokenizer)


def _images(*counts):
  return "".join(f"<|vision_start|>{PAD * c}<|vision_end|>" for c in counts)


def _check(tokenizer, tokens, expected_text, loss_texts=()):
  """The ids are exactly the tokenisation of expected_text; the loss mask covers
  exactly loss_texts, one contiguous run each, in order."""
  expected_ids = tokenizer(expected_text, add_special_tokens=False)["input_ids"]
  assert tokens.input_ids.tolist() == expected_ids
  assert tokenizer.decode(tokens.input_ids) == expected_text
  assert tokens.input_ids.dtype == np.int32
  runs = np.split(np.flatnonzero(tokens.loss_mask),
                  np.flatnonzero(np.diff(np.flatnonzero(tokens.loss_mask)) > 1) + 1)
  runs = [r for r in runs if len(r)]
  assert [tokenizer.decode(tokens.input_ids[r]) for r in runs] == list(loss_texts)
  emb_id = tokenizer.convert_tokens_to_ids(tok.EMB_TOKEN)
  assert tokens.emb_positions.tolist() == np.flatnonzero(
      tokens.input_ids == emb_id).tolist()


def test_document(tokenizer, dialogues):
  tokens = dialogues.document([4, 2])
  _check(tokenizer, tokens,
         f"<|im_start|>user\n{_images(4, 2)}<|im_end|>\n"
         f"<|im_start|>assistant\n{EMPTY_THINK}<emb_all><|im_end|>\n")
  assert len(tokens.emb_positions) == 1 and tokens.num_image_tokens == 6
  # <emb_all> comes right after the empty think block.
  assert tokenizer.decode(tokens.input_ids[:tokens.emb_positions[0]]).endswith(
      "assistant\n<think>\n\n</think>\n\n")
  assert not tokens.loss_mask.any()


def test_two_stage_query(tokenizer, dialogues):
  tokens = dialogues.two_stage_query([3], "make it blue and striped")
  _check(tokenizer, tokens,
         f"<|im_start|>user\n{_images(3)}<|im_end|>\n"
         f"<|im_start|>assistant\n{EMPTY_THINK}<emb_all><|im_end|>\n"
         f"<|im_start|>user\nmake it blue and striped<|im_end|>\n"
         f"<|im_start|>assistant\n{EMPTY_THINK}<emb_all><|im_end|>\n")
  first, last = tokens.emb_positions
  assert first < last == len(tokens) - 3  # <emb_all> <|im_end|> \n


def test_two_stage_query_with_chain_of_thought(tokenizer, dialogues):
  tokens = dialogues.two_stage_query(
      [2, 2], "make it blue", reasoning=("red striped dress", "blue striped dress."))
  _check(tokenizer, tokens,
         f"<|im_start|>user\n{_images(2, 2)}<|im_end|>\n"
         f"<|im_start|>assistant\n<think>\nred striped dress\n</think>\n\n"
         f"<emb_all><|im_end|>\n"
         f"<|im_start|>user\nmake it blue<|im_end|>\n"
         f"<|im_start|>assistant\n<think>\nblue striped dress.\n</think>\n\n"
         f"<emb_all><|im_end|>\n",
         loss_texts=["red striped dress", "blue striped dress."])
  assert len(tokens.emb_positions) == 2


def test_single_stage_query(tokenizer, dialogues):
  tokens = dialogues.single_stage_query([5], "make it green", reasoning="green coat")
  _check(tokenizer, tokens,
         f"<|im_start|>user\n{_images(5)}make it green<|im_end|>\n"
         f"<|im_start|>assistant\n<think>\ngreen coat\n</think>\n\n"
         f"<emb_all><|im_end|>\n",
         loss_texts=["green coat"])


def test_caption(tokenizer, dialogues):
  tokens = dialogues.caption("red striped long-sleeved dress")
  _check(tokenizer, tokens,
         "<|im_start|>user\nred striped long-sleeved dress<|im_end|>\n"
         f"<|im_start|>assistant\n{EMPTY_THINK}<emb_all><|im_end|>\n")
  assert tokens.num_image_tokens == 0


def test_sft(tokenizer, dialogues):
  tokens = dialogues.sft([2], "A long dress in red.")
  _check(tokenizer, tokens,
         f"<|im_start|>user\n{_images(2)}Describe this product in detail.<|im_end|>\n"
         f"<|im_start|>assistant\n{EMPTY_THINK}A long dress in red.<|im_end|>\n",
         loss_texts=["A long dress in red.<|im_end|>"])
  assert len(tokens.emb_positions) == 0


def test_template_that_writes_its_own_think_block(tokenizer):
  """Templates that open assistant turns with a think block give the same ids."""
  own = tokenizer.chat_template.replace(
      "{{ '<|im_start|>' + message['role'] + '\\n' }}",
      "{{ '<|im_start|>' + message['role'] + '\\n' }}"
      "{%- if message['role'] == 'assistant' -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
      "{%- endif -%}")
  assert own != tokenizer.chat_template
  plain = dialogue.Dialogues(tokenizer).two_stage_query([2], "make it red", ("a", "b"))
  original = tokenizer.chat_template
  try:
    tokenizer.chat_template = own
    other = dialogue.Dialogues(tokenizer).two_stage_query(
        [2], "make it red", ("a", "b"))
  finally:
    tokenizer.chat_template = original
  assert other.input_ids.tolist() == plain.input_ids.tolist()
  assert other.loss_mask.tolist() == plain.loss_mask.tolist()


def test_special_tokens_in_data_are_refused(dialogues):
  with pytest.raises(ValueError, match="special token '<emb_all>'"):
    dialogues.two_stage_query([1], "make it <emb_all> blue")
  with pytest.raises(ValueError, match="special token '<|im_end|>'"):
    dialogues.caption("a dress<|im_end|>")


def test_emb_token_is_added_when_missing(tmp_path):
  """A stock Qwen3.5 tokenizer has no <emb_all>: loading appends it as a new id."""
  from procir_jax import tiny_model
  stock = tiny_model.Qwen3_5Tokenizer(vocab={"a": 0, "b": 1}, merges=[])
  stock.add_tokens([t for t in tiny_model.SPECIAL_TOKENS if t != tok.EMB_TOKEN],
                   special_tokens=True)
  stock.chat_template = tiny_model.CHAT_TEMPLATE
  stock.save_pretrained(str(tmp_path))
  loaded = tok.load_tokenizer(str(tmp_path))
  assert len(loaded) == len(stock) + 1
  assert loaded.convert_tokens_to_ids(tok.EMB_TOKEN) == len(stock)
