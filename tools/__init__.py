"""Maintainer tools, run from the repository root as modules (no sys.path edits):

    python -m tools.pretrain_tiny --out DIR      # train the built-in tiny model (docs/pretrain_tiny.md)
    python -m tools.make_demo_styles             # draw the demo styles in styles/
    python -m tools.clip_vocab                   # write the tiny model's CLIP tokenizer files

`tiny_data` draws the procedural shapes both use (and the tests check the model against).
"""
