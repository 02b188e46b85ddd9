// Reads a character-card PNG the way SillyTavern does, with the same chunk packages, and prints
// the cards it holds as one JSON object: {"chara": <V2 card>, "ccv3": <V3 card>} (a key is
// absent when its chunk is). Independent of Conveyor's Python reader, for the tests to compare.
//
//   node read_card.js CARD.png
"use strict";

const fs = require("fs");
const extractChunks = require("png-chunks-extract");
const textChunk = require("png-chunk-text");

function readCards(path) {
  const chunks = extractChunks(fs.readFileSync(path));
  const cards = {};
  for (const chunk of chunks) {
    if (chunk.name !== "tEXt") continue;
    const { keyword, text } = textChunk.decode(chunk.data);
    const key = keyword.toLowerCase();
    if (key === "chara" || key === "ccv3") {
      cards[key] = JSON.parse(Buffer.from(text, "base64").toString("utf8"));
    }
  }
  return cards;
}

if (process.argv.length !== 3) {
  process.stderr.write("usage: node read_card.js CARD.png\n");
  process.exit(2);
}
process.stdout.write(JSON.stringify(readCards(process.argv[2])) + "\n");
