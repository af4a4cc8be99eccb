"""The `cai:` recipe section: Constitutional AI (Bai et al., 2022, arXiv:2212.08073) as a tunekit stage.

Phase 1 (SL-CAI) critiques and revises the policy's answers against sampled principles and fine-tunes on the
final revisions; phase 2 (RL-CAI) turns the feedback model's multiple-choice judgements of response pairs into
a preference dataset and trains on it with DPO. The shared sections (model, data, adapter, train, generate)
configure the derived `sft` and `dpo` sub-runs; `data.train`, when set, is helpfulness data mixed into phase 1.
`CaiConfig` is defined with the other stage sections in `tunekit.config.stages` (the recipe schema's floor), so
the schema never imports the CAI package.
"""

from tunekit.config.stages import CaiConfig

__all__ = ["CaiConfig"]
