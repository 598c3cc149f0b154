"""Importing the released CPM-2 checkpoints and tokenizer: one job per module.

- `bminf`: BMInf's binary `checkpoint.pt` (the inference release), read by streaming;
- `megatron`: the model-parallel shards of the training release, merged by the public split rules;
- `layout`: both releases' tensors named and shaped as cpmctl's encoder-decoder model;
- `tokenizer`: the CPM-2 tokenizer (jieba, then greedy sub-word lookup in vocab.txt);
- `convert`: `cpmctl convert cpm2`, planning (`--dry-run`) and writing the checkpoint.
"""
