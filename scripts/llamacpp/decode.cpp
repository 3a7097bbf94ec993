// modelpress-decode: batch-1 greedy decode speed of a GGUF model in llama.cpp, to compare with modelpress's own
// CPU decode on the same prompt and thread count (bench/cpu_decode.py --llamacpp).
// Usage: modelpress-decode MODEL.gguf PROMPT.i32 PROMPT_TOKENS NEW_TOKENS THREADS
// PROMPT.i32 holds PROMPT_TOKENS int32 token ids. The prompt is decoded in one batch (timed: prefill), then
// NEW_TOKENS tokens one at a time, each the argmax of the last logits (timed: decode). Prints one line:
//   prefill_s decode_s_per_token token token ...
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static llama_token argmax(const float * logits, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s MODEL.gguf PROMPT.i32 PROMPT_TOKENS NEW_TOKENS THREADS\n", argv[0]);
        return 2;
    }
    const int n_prompt = std::atoi(argv[3]);
    const int n_new = std::atoi(argv[4]);
    const int threads = std::atoi(argv[5]);
    std::vector<llama_token> prompt(n_prompt);
    FILE * in = std::fopen(argv[2], "rb");
    if (!in || std::fread(prompt.data(), sizeof(llama_token), prompt.size(), in) != prompt.size()) {
        std::fprintf(stderr, "cannot read %d tokens from %s\n", n_prompt, argv[2]);
        return 1;
    }
    std::fclose(in);

    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        std::fprintf(stderr, "llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_prompt + n_new;
    cparams.n_batch = n_prompt;
    cparams.n_ubatch = n_prompt;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        std::fprintf(stderr, "llama.cpp could not create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    double start = now();
    if (llama_decode(ctx, llama_batch_get_one(prompt.data(), n_prompt)) != 0) {
        std::fprintf(stderr, "llama_decode failed on the prompt\n");
        return 1;
    }
    llama_token token = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    const double prefill = now() - start;

    std::vector<llama_token> made = {token};
    start = now();
    for (int i = 1; i < n_new; ++i) {
        if (llama_decode(ctx, llama_batch_get_one(&token, 1)) != 0) {
            std::fprintf(stderr, "llama_decode failed at token %d\n", i);
            return 1;
        }
        token = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        made.push_back(token);
    }
    const double decode = n_new > 1 ? (now() - start) / (n_new - 1) : 0.0;

    std::printf("%.6f %.6f", prefill, decode);
    for (llama_token t : made) {
        std::printf(" %d", t);
    }
    std::printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
