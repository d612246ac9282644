/* Out-of-line copies of DPDK's static inline fast-path functions (see shim.h). */
#include "shim.h"

int am_shim_errno(void) { return rte_errno; }

uint16_t am_shim_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t am_shim_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mbuf *am_shim_alloc(struct rte_mempool *pool) { return rte_pktmbuf_alloc(pool); }

void am_shim_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

void am_shim_free_bulk(struct rte_mbuf **pkts, unsigned int n) { rte_pktmbuf_free_bulk(pkts, n); }

uint8_t *am_shim_data(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, uint8_t *); }

uint16_t am_shim_data_len(const struct rte_mbuf *m) { return m->data_len; }

uint32_t am_shim_pkt_len(const struct rte_mbuf *m) { return m->pkt_len; }

uint16_t am_shim_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

uint16_t am_shim_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

uint8_t *am_shim_append(struct rte_mbuf *m, uint16_t len)
{
    return (uint8_t *)rte_pktmbuf_append(m, len);
}

void am_shim_tx_ipv4_cksum(struct rte_mbuf *m, uint16_t l2_len, uint16_t l3_len)
{
    m->l2_len = l2_len;
    m->l3_len = l3_len;
    m->ol_flags |= RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM;
}

int am_shim_rx_ip_cksum(const struct rte_mbuf *m)
{
    switch (m->ol_flags & RTE_MBUF_F_RX_IP_CKSUM_MASK) {
    case RTE_MBUF_F_RX_IP_CKSUM_GOOD:
        return 1;
    case RTE_MBUF_F_RX_IP_CKSUM_BAD:
        return 2;
    default:
        return 0;
    }
}

unsigned int am_shim_ring_enqueue_burst(struct rte_ring *r, struct rte_mbuf **pkts, unsigned int n)
{
    return rte_ring_enqueue_burst(r, (void *const *)pkts, n, NULL);
}

unsigned int am_shim_ring_dequeue_burst(struct rte_ring *r, struct rte_mbuf **pkts, unsigned int n)
{
    return rte_ring_dequeue_burst(r, (void **)pkts, n, NULL);
}

unsigned int am_shim_ring_count(const struct rte_ring *r) { return rte_ring_count(r); }
