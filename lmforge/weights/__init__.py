"""On-disk formats, owned here alone; train, infer and interop call this package.

checkpoint.py        DCP training-checkpoint folders: save, load, the complete/latest rule,
                     temporaries, resume resolution
safe_meta.py         the exact allow-list unpickler and vetting of DCP's `.metadata` index
torch_pickle.py      the one torch.load (weights_only), refusals as one line
files.py             lmforge's weights-only forms (folder / lone file), consolidation
safetensors_io.py    the one safetensors writer and reader; HF folder weight files
shapes.py            the one shape-compatibility check and its error wording
dtypes.py            the one dtype table and name resolution
tokenizer_files.py   the tokenizer files that travel with weights
outdir.py            output folders: refuse what lmforge did not write, temp sibling + rename
"""
