"""SFT data for LoRA fine-tuning, one import for callers: MiniMind jsonl -> tokenized cache -> numpy batches.

The pieces, each with its contract in its docstring:
  train.records  the jsonl format, validation, `DataError` (one line naming file:line)
  train.dataset  tokenization exactly like MiniMind's, labels, augmentations, the cache (`load_sft_dataset`)
  train.packing  best-fit-decreasing rows (`pack_rows`) and length grouping
  train.loader   `SFTLoader`: padded / packed / token-budget batches (their shapes), host sharding, resume
"""
from train.dataset import CACHE_VERSION, DEFAULT_CACHE_DIR, IGNORE, SFTDataset, assistant_labels, load_sft_dataset
from train.loader import SFTLoader, packed_row_len
from train.packing import group_by_length, pack_rows
from train.records import EMPTY_THINK, ROLES, SYSTEM_PROMPTS, DataError, parse_record

__all__ = ["CACHE_VERSION", "DEFAULT_CACHE_DIR", "EMPTY_THINK", "IGNORE", "ROLES", "SYSTEM_PROMPTS", "DataError",
           "SFTDataset", "SFTLoader", "assistant_labels", "group_by_length", "load_sft_dataset", "pack_rows",
           "packed_row_len", "parse_record"]
