"""Training data and the files derived from it: sources (image folders, datasets, WebDataset, toy), the latent /
text cache, prompt lists, and reflow coupling sets."""
