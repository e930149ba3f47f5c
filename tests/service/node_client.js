// A client in another language, as another team would write it: the .proto files loaded at run time
// with @grpc/proto-loader, @grpc/grpc-js with its default settings (4 MiB receive limit, no
// options), nothing generated. Used by test_node_client.py.
//
//   node node_client.js ADDRESS PROTO_ROOT MODEL TAP OUT.png BIG_MODEL BIG_TAP
//
// Prints one JSON object: the models ListModels lists, the taps of MODEL, what a streamed Maximize
// of channel 0 at TAP sent (event kinds in order, progress steps; its PNG goes to OUT.png), the
// error a missing model gets (code and the google.rpc.Status trailer, base64), and a 640x640
// Maximize of BIG_MODEL with its float tensor, larger than 4 MiB, as it arrived (in chunks).
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoRoot, model, tap, out, bigModel, bigTap] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(protoRoot, "preimage/v1/preimage.proto"), {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto (snake_case)
  longs: Number,
  enums: String,
  defaults: false,
  oneofs: true, // each oneof's set member is named in a virtual field ("event")
});
const api = grpc.loadPackageDefinition(definition).preimage.v1;
const client = new api.PreimageService(address, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 120000);

function unary(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: deadline() }, (err, reply) => (err ? reject(err) : resolve(reply))),
  );
}

function maximize() {
  return new Promise((resolve, reject) => {
    const call = client.Maximize(
      {
        model,
        tap,
        targets: [{ channel: { channel: 0 } }],
        channel_max: 1.0,
        params: { steps: 6, preset: "PRESET_PAPER" },
        options: { height: 32, width: 32, seed: 3, report_every: 2 },
      },
      { deadline: deadline() },
    );
    const kinds = [];
    const steps = [];
    let png = null;
    call.on("data", (response) => {
      kinds.push(response.event);
      if (response.event === "progress") steps.push([response.progress.step, response.progress.total_steps]);
      if (response.event === "result") png = response.result.png;
    });
    call.on("error", reject);
    call.on("end", () => resolve({ kinds, steps, png }));
  });
}

function missingModel() {
  return unary("GetModel", { model: "no-such-model" }).then(
    () => ({ code: 0 }),
    (err) => {
      const details = err.metadata.get("grpc-status-details-bin");
      return { code: err.code, message: err.details, status: details.length ? details[0].toString("base64") : "" };
    },
  );
}

function big() {
  return new Promise((resolve, reject) => {
    const call = client.Maximize(
      {
        model: bigModel,
        tap: bigTap,
        targets: [{ channel: { channel: 0 } }],
        channel_max: 1.0,
        params: { steps: 1, preset: "PRESET_PAPER" },
        options: { height: 640, width: 640, return_tensor: true, report_every: 0 },
      },
      { deadline: deadline() },
    );
    const chunks = {};
    let result = null;
    call.on("data", (response) => {
      if (response.event === "chunk") {
        const c = response.chunk;
        (chunks[c.field] = chunks[c.field] || []).push(c.data);
      }
      if (response.event === "result") result = response.result;
    });
    call.on("error", reject);
    call.on("end", () => {
      if (result === null) return; // the stream failed: "error" has rejected already
      const tensor = Buffer.concat(chunks.CHUNK_FIELD_TENSOR || []);
      resolve({ shape: result.tensor.shape, tensor_bytes: tensor.length, inline_bytes: (result.tensor.data || []).length });
    });
  });
}

(async () => {
  const models = await unary("ListModels", {});
  const taps = await unary("ListTaps", { model });
  const run = await maximize();
  fs.writeFileSync(out, run.png);
  console.log(
    JSON.stringify({
      models: models.models.map((m) => m.name),
      taps: taps.taps.map((t) => t.name),
      kinds: run.kinds,
      steps: run.steps,
      missing: await missingModel(),
      big: await big(),
    }),
  );
  client.close();
})().catch((err) => {
  console.error(`node client failed: ${err.code} ${err.details || err.message}`);
  process.exit(1);
});
