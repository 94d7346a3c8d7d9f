/* gp-llama-logits MODEL.gguf TOKENS.bin OUT.bin [THREADS [--no-repack]]
 *
 * Runs llama.cpp on the int32 token ids of TOKENS.bin as one sequence and writes the float32 logits
 * of every position to OUT.bin (row-major, n_tokens x n_vocab). The stock tools print only the last
 * position or log-probabilities, which is not enough to compare a GGUF against the HF model.
 * --no-repack does what the stock tools' flag of that name does: the weights stay out of llama.cpp's
 * extra buffer types (repacked CPU layouts, the AMX buffer type).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int fail(const char *what, const char *arg) {
    fprintf(stderr, "gp-llama-logits: %s %s\n", what, arg ? arg : "");
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) return fail("usage: gp-llama-logits MODEL.gguf TOKENS.bin OUT.bin [THREADS [--no-repack]]", NULL);
    int threads = argc > 4 ? atoi(argv[4]) : 2;
    bool repack = true;
    for (int i = 5; i < argc; ++i) {
        if (strcmp(argv[i], "--no-repack") != 0) return fail("unknown option", argv[i]);
        repack = false;
    }

    FILE *in = fopen(argv[2], "rb");
    if (!in) return fail("cannot read", argv[2]);
    fseek(in, 0, SEEK_END);
    long bytes = ftell(in);
    fseek(in, 0, SEEK_SET);
    int n = (int)(bytes / (long)sizeof(llama_token));
    if (n <= 0) return fail("no token ids in", argv[2]);
    llama_token *tokens = malloc((size_t)n * sizeof(llama_token));
    if (fread(tokens, sizeof(llama_token), (size_t)n, in) != (size_t)n) return fail("short read of", argv[2]);
    fclose(in);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mparams = llama_model_default_params();
    mparams.use_extra_bufts = repack;
    struct llama_model *model = llama_model_load_from_file(argv[1], mparams);
    if (!model) return fail("cannot load", argv[1]);

    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t)n;
    cparams.n_batch = (uint32_t)n;
    cparams.n_ubatch = (uint32_t)n;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.no_perf = true;
    cparams.type_k = GGML_TYPE_F32; /* an f16 cache would round every key and value */
    cparams.type_v = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED; /* the plain softmax path, all float32 */
    struct llama_context *ctx = llama_init_from_model(model, cparams);
    if (!ctx) return fail("cannot create a context for", argv[1]);

    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) return fail("llama_decode failed on", argv[2]);

    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE *out = fopen(argv[3], "wb");
    if (!out) return fail("cannot write", argv[3]);
    for (int i = 0; i < n; ++i) {
        const float *row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab) return fail("cannot write", argv[3]);
    }
    if (fclose(out) != 0) return fail("cannot write", argv[3]);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(tokens);
    return 0;
}
