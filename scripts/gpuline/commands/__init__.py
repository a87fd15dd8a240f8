"""Commands that parse their own arguments (registered in ``gpuline.cli.STANDALONE``)."""
