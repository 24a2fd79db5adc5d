"""Data: the LLaVA conversation format (`llava_format`), batching conversations for training (`collate`),
loading images safely (`images`), and the synthetic ShapesWorld VQA world (`shapesworld`)."""
