// A client in another language, as another team would write it: the .proto files loaded at run time
// with @grpc/proto-loader, @grpc/grpc-js with its default settings (4 MiB receive limit, no
// options), nothing generated. Used by test_node_client.py.
//
//   node node_client.js ADDRESS PROTO_ROOT MODEL TAP OUT.png
//
// Prints one JSON object: the models ListModels lists, the taps of MODEL, and what a streamed
// Maximize of channel 0 at TAP sent (event kinds in order, progress steps); writes its PNG to OUT.png.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoRoot, model, tap, out] = process.argv.slice(2);
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
    }),
  );
  client.close();
})().catch((err) => {
  console.error(`node client failed: ${err.code} ${err.details || err.message}`);
  process.exit(1);
});
