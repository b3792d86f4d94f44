"""Benchmark suite for clinically conditioned 3-D brain-MRI generation (Mashhadi et al., VAE-GAN + DDPM prior)."""
