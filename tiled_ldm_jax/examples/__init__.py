"""Example code that the docs show and the commands run (`own_model`: a U-Net you
trained, sampled with `sampling.sample`); kept in the package so that tests can hold the
docs to it."""
