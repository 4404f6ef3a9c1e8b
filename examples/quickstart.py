"""Offline quickstart: build the tiny ViLaVT, encode a generated image with and without a query, and
run one forward pass through the chat template. No download, runs in seconds on a CPU."""

import torch
from PIL import Image, ImageDraw

from vilavt import tiny_vilavt


def main():
    model, processor = tiny_vilavt(seed=0)
    image = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(image).rectangle((400, 300, 460, 350), outline="red", width=4)

    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is in the red frame?"}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
        # The same image re-encoded conditioned on a query: f_t = V(C_t, q_t) instead of f0 = V(I, ∅).
        query, _ = processor.tokenize_queries(["what is inside the red frame"])
        f0 = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        ft = torch.cat(
            model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"], **query, image_to_query_mapping=torch.tensor([0])
            ).pooler_output
        )
    print(f"prompt tokens: {inputs['input_ids'].shape[1]}, image tokens: {f0.shape[0]}, logits: {tuple(logits.shape)}")
    print(f"mean |V(I, q) - V(I, ∅)| = {(ft - f0).abs().mean():.4f}  (the query changes the image features)")


if __name__ == "__main__":
    main()
