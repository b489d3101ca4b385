"""Files from outside, read safely (format from the signature, bounded sizes, nothing
executed: `json_files`, `image_files`, `latent_files`), and the one
atomic-write helper (`atomic`)."""
