#!/usr/bin/env node
// llama.cpp itself (the prebuilt CPU binaries inside node-llama-cpp, pinned in package.json) on a GGUF
// model and, optionally, a GGUF LoRA adapter: perplexity, prompt-processing speed, greedy generation.
//
// By hand:
//   node runtimes/llamacpp/ppl.mjs MODEL.gguf [ADAPTER.gguf] --text FILE [--seq-len 512] [--windows 8] [--threads 2]
// prints the perplexity of MODEL and, with ADAPTER, of MODEL + ADAPTER (scale 1) on the first N
// non-overlapping windows of FILE tokenized by llama.cpp (no BOS), every next token counted.
//
// For qaft (`qaft eval --runtime llama.cpp`): `--job FILE` (or `--job -` for stdin) reads the token ids
// from JSON, so llama.cpp sees exactly the ids the other rows of qaft's table see:
//   {"windows": [[id, ...], ...], "prompts": [[id, ...], ...], "new_tokens": 16, "speed_tokens": 512, "token_nll": false}
// ("token_nll": true adds each window's per-token negative log-likelihoods to the rows; "perplexity": false
// skips the perplexity, e.g. to time prompt processing alone)
// and stdout gets one JSON object: {"rows": {"model": {...}, "model+adapter": {...}}, "runtime": {...}}.
//
// Any failure (a missing or corrupted file, a bad argument) is one line on stderr and exit status 2.
import fs from "node:fs";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const USAGE = "usage: node ppl.mjs MODEL.gguf [ADAPTER.gguf] (--text FILE [--seq-len 512] [--windows 8] | --job FILE|-) [--threads N]";

class Fail extends Error {}

function parseArgs(argv) {
    const opts = { files: [], seqLen: 512, windows: 8, threads: 2 };
    const number = (flag, v) => {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1) throw new Fail(`${flag}: expected a positive integer, got ${JSON.stringify(v)}; ${USAGE}`);
        return n;
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) throw new Fail(`${a}: needs a value; ${USAGE}`);
            return argv[++i];
        };
        if (a === "--text") opts.text = value();
        else if (a === "--job") opts.job = value();
        else if (a === "--seq-len") opts.seqLen = number(a, value());
        else if (a === "--windows") opts.windows = number(a, value());
        else if (a === "--threads") opts.threads = number(a, value());
        else if (a === "-h" || a === "--help") throw new Fail(USAGE);
        else if (a.startsWith("--")) throw new Fail(`unknown option ${a}; ${USAGE}`);
        else opts.files.push(a);
    }
    if (opts.files.length < 1 || opts.files.length > 2) throw new Fail(`give a model file and at most one adapter file; ${USAGE}`);
    if ((opts.text == null) === (opts.job == null)) throw new Fail(`give either --text FILE or --job FILE; ${USAGE}`);
    for (const f of opts.files) if (!fs.existsSync(f)) throw new Fail(`${f}: no such file`);
    return opts;
}

function readJob(where) {
    const raw = where === "-" ? fs.readFileSync(0, "utf8") : fs.readFileSync(where, "utf8");
    const job = JSON.parse(raw);
    const ids = (x) => Array.isArray(x) && x.every((w) => Array.isArray(w) && w.every(Number.isInteger));
    if (!ids(job.windows) || !ids(job.prompts ?? [])) throw new Fail(`${where}: "windows" and "prompts" must be lists of lists of token ids`);
    return job;
}

// Next-token negative log-likelihood of every position of every window (the full distribution at
// temperature 1, nothing truncated: top-k 0, top-p 1, min-p 0). One window per batch, one sequence:
// llama.cpp picks its matrix kernels by batch size, so windows sharing batches (parallel sequences)
// would make the numbers depend on scheduling.
async function nll(sequence, windows, keepTokens = false) {
    const options = { temperature: 1, topK: 0, topP: 1, minP: 0 };
    const perWindow = [];
    const t0 = performance.now();
    for (const w of windows) {
        await sequence.clearHistory();
        const input = w.map((t, i) => (i < w.length - 1 ? [t, { generateNext: { probabilities: true, options } }] : t));
        const tokenNll = new Array(w.length - 1);
        // Each distribution is read as it arrives and dropped: kept, 511 of them hold gigabytes.
        const onTokenResult = (i, output) => {
            tokenNll[i] = -Math.log(output.next.probabilities.get(w[i + 1]) ?? 0);
            delete output.next.probabilities;
        };
        await sequence.controlledEvaluate(input, { onTokenResult });
        perWindow.push(tokenNll);
    }
    await sequence.clearHistory();
    const all = perWindow.flat();
    const total = all.reduce((a, b) => a + b, 0);
    const row = { nll: total / all.length, ppl: Math.exp(total / all.length), tokens: all.length, windows: windows.length, seconds: (performance.now() - t0) / 1000 };
    if (keepTokens) row.token_nll = perWindow;
    return row;
}

// Prompt processing alone (no logits read back): the speed a user sees before the first new token.
// The best of three runs: on a shared machine the fastest run is the one least disturbed.
async function promptSpeed(sequence, tokens) {
    await sequence.clearHistory();
    await sequence.evaluateWithoutGeneratingNewTokens(tokens.slice(0, 8)); // warm-up: first-call allocations
    let best = Infinity;
    for (let r = 0; r < 3; r++) {
        await sequence.clearHistory();
        const t0 = performance.now();
        await sequence.evaluateWithoutGeneratingNewTokens(tokens);
        best = Math.min(best, (performance.now() - t0) / 1000);
    }
    await sequence.clearHistory();
    return tokens.length / best;
}

async function greedy(sequence, prompts, newTokens) {
    const outs = [];
    for (const p of prompts) {
        await sequence.clearHistory();
        const got = [];
        for await (const t of sequence.evaluate(p, { temperature: 0, yieldEogToken: true })) {
            got.push(t);
            if (got.length >= newTokens) break;
        }
        outs.push(got);
    }
    await sequence.clearHistory();
    return outs;
}

function windowsOf(ids, seqLen, n) {
    const out = [];
    for (let s = 0; s + seqLen <= ids.length && out.length < n; s += seqLen) out.push(ids.slice(s, s + seqLen));
    if (out.length === 0) throw new Fail(`the text has ${ids.length} tokens, fewer than one window of ${seqLen}`);
    return out;
}

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    const errors = [];
    const llama = await getLlama({
        gpu: false,
        build: "never",
        logLevel: LlamaLogLevel.error,
        logger: (level, message) => {
            if (level === LlamaLogLevel.error || level === LlamaLogLevel.fatal) errors.push(message.trim());
        },
    });
    const load = async (what, fn) => {
        try {
            return await fn();
        } catch (e) {
            const why = errors.find(Boolean) ?? e.message; // the first error llama.cpp logged is the cause, the rest follow from it
            errors.length = 0;
            throw new Fail(`${what}: llama.cpp cannot load it (${why}); re-export it, e.g. \`qaft export CONFIG --overwrite\``);
        }
    };
    const [modelPath, adapterPath] = opts.files;
    const model = await load(modelPath, () => llama.loadModel({ modelPath, gpuLayers: 0 }));
    const job = opts.job != null ? readJob(opts.job) : null;
    const windows = job ? job.windows : windowsOf(model.tokenize(fs.readFileSync(opts.text, "utf8"), false), opts.seqLen, opts.windows);
    const longest = Math.max(...windows.map((w) => w.length), ...(job?.prompts ?? []).map((p) => p.length + (job.new_tokens ?? 0)), 8);
    const vocab = model.tokens.nTokens ?? Infinity;
    for (const w of [...windows, ...(job?.prompts ?? [])])
        for (const t of w) if (t < 0 || t >= vocab) throw new Fail(`token id ${t} is outside ${path.basename(modelPath)}'s vocabulary of ${vocab}`);
    const runs = [["model", null], ...(adapterPath ? [["model+adapter", adapterPath]] : [])];
    const rows = {};
    for (const [name, adapter] of runs) {
        const context = await load(adapter ?? modelPath, () =>
            model.createContext({
                contextSize: longest,
                batchSize: longest,
                sequences: 1,
                threads: opts.threads,
                ...(adapter ? { lora: { adapters: [{ filePath: adapter, scale: 1 }] } } : {}),
            }),
        );
        const sequence = context.getSequence();
        const row = windows.length && job?.perplexity !== false ? await nll(sequence, windows, !!job?.token_nll) : {};
        if (job) {
            if (windows.length) row.prompt_tokens_per_s = await promptSpeed(sequence, windows[0].slice(0, job.speed_tokens ?? windows[0].length));
            if (job.prompts?.length) row.generations = await greedy(sequence, job.prompts, job.new_tokens ?? 16);
        }
        rows[name] = row;
        await context.dispose();
    }
    if (job) {
        const runtime = { name: "llama.cpp", release: llama.llamaCppRelease?.release ?? null, build: llama.buildType, threads: opts.threads };
        process.stdout.write(JSON.stringify({ rows, runtime }) + "\n");
    } else {
        const w = windows.length;
        for (const [name, r] of Object.entries(rows)) {
            const file = name === "model" ? modelPath : `${modelPath} + ${adapterPath}`;
            console.log(`${file}: perplexity ${r.ppl.toFixed(4)} (${w} windows x ${windows[0].length} tokens, ${r.tokens} predicted, ${r.seconds.toFixed(1)} s)`);
        }
    }
    await model.dispose();
    await llama.dispose();
}

try {
    await main();
} catch (e) {
    const line = e instanceof Fail || e instanceof SyntaxError ? e.message : `llama.cpp: ${e?.message ?? e}`;
    process.stderr.write(`ppl.mjs: ${line.split("\n")[0]}\n`);
    process.exit(2);
}
