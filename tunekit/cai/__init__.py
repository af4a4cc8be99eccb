"""Constitutional AI (Bai et al., 2022): constitution, critique/revision loop, AI-feedback preferences."""
