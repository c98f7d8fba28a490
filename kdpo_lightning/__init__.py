"""kdpo-lightning: knowledge editing with KDPO on PyTorch Lightning."""
