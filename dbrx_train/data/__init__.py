"""Data for training: token-sequence MDS datasets and their loaders. Knows nothing of the model.
Nothing is imported here, so a light module (tokenizer, chat) does not pull in torch and Streaming.

token_mds.py  the on-disk format (LLM Foundry's `tokens` column) and its checks
prepare.py    text files -> tokenized, packed MDS (used by data_prep/ scripts)
text.py       pretraining loader: config dataclasses, TokenSequenceDataset, build_text_dataloader
finetuning.py conversations -> input_ids/labels MDS (assistant turns trained), padded loader
finetuning_files.py  LLM Foundry's hf_name: .jsonl/.parquet files tokenized when a run starts
loaders.py    the loader kinds by `name` (text | finetuning)
mixture.py    curriculum data-mix schedules -> constant-mix segments
integrity.py  shard files against index.json (verify_shards) and read errors naming the shard
streaming_shm.py  Streaming shared memory left by killed runs, removed safely
"""
